"""Weight sync: bucket bounds; after an optimizer step at TP=2 the engine samples with the policy's log-probs;
at PP=2 the engine ends up with exactly the policy's weights.

fp32 on CPU, 2 gloo ranks. Log-prob tolerance 1e-5 (measured 5e-7); the step itself moves them by > 1e-3
(measured 0.57 untied, 1.55 tied).
"""
import weakref

import pytest
import torch

from megatron_tr1.convert.mapping import Dims, expected_hf_names
from megatron_tr1.errors import ConfigError
from megatron_tr1.rollout.weight_sync import SyncStats, bucketed, check_bucket_bytes
from megatron_tr1.testing.multiproc import run_ranks
from megatron_tr1.testing.tiny_model import tiny_hf_config

import _cases

LOGPROB_ATOL = 1e-5


def test_bucket_smaller_than_a_tensor_is_an_error():
    dims = Dims.from_hf_config(tiny_hf_config())
    largest = 512 * 128 * 2  # embedding, LM head and merger fc1 in bf16
    check_bucket_bytes(dims, torch.bfloat16, largest)
    with pytest.raises(ConfigError, match=r"sync_bucket_bytes=131071 is smaller than tensor \S+ \[\d+, \d+\] in "
                                          r"torch.bfloat16 \(131072 bytes\); set it to at least 131072$"):
        check_bucket_bytes(dims, torch.bfloat16, largest - 1)
    with pytest.raises(ConfigError, match=r"tensor big \[10, 10\] in torch.float32 \(400 bytes\)"):
        list(bucketed(iter([("small", torch.zeros(2)), ("big", torch.zeros(10, 10))]), torch.float32, 399,
                      SyncStats()))


def test_buffered_bytes_never_exceed_the_bucket():
    """The source records every tensor still alive when it is asked for the next one: that is what the
    bucketing holds (the consumer drops each tensor before asking for the next)."""
    alive, peaks = [], []
    sizes = [3, 7, 1, 4, 4, 9, 2, 2, 5, 8]  # buckets of <= 10: 3 7 | 1 4 4 | 9 | 2 2 5 | 8

    def source():
        for i, n in enumerate(sizes):
            peaks.append(sum(t().nbytes for t in alive if t() is not None))
            tensor = torch.full((n,), float(i))  # already float32: the bucket keeps this very tensor
            alive.append(weakref.ref(tensor))
            yield f"t{i}", tensor
            del tensor

    stats = SyncStats()
    limit = 40  # bytes: 10 float32 values
    names, stream = [], bucketed(source(), torch.float32, limit, stats)
    while (item := next(stream, None)) is not None:
        names.append(item[0])
        del item
    assert names == [f"t{i}" for i in range(len(sizes))]
    assert max(peaks) <= limit and stats.peak_bucket_bytes <= limit
    assert stats.buckets == 5 and stats.tensors == len(sizes) and stats.bytes == 4 * sum(sizes)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tp2_sync_after_optimizer_step_matches_policy(tie):
    bucket = 300 * 1024  # the largest tensor is 256 KiB in fp32: several buckets for the tiny model
    results = run_ranks(_cases.sync_case, 2, tie, bucket)
    stats = results[0]["stats"]
    required, _ = expected_hf_names(Dims.from_hf_config(tiny_hf_config(tie_word_embeddings=tie)))
    assert stats.tensors == len(required) and ("lm_head.weight" in required) != tie
    assert stats.buckets > 5 and 0 < stats.peak_bucket_bytes <= bucket
    assert results[0]["max_diff"] < LOGPROB_ATOL
    assert results[0]["step_change"] > 1e-3


def test_pp2_sync_equals_policy_weights():
    stats, max_diff = run_ranks(_cases.pp_sync_case, 2, True)[0]
    assert max_diff == 0.0
    required, _ = expected_hf_names(Dims.from_hf_config(tiny_hf_config(tie_word_embeddings=True)))
    assert stats.tensors == len(required)  # the last stage's copy of the tied embedding is not sent
