"""Megatron TP=2 -> vLLM on every rank (``external_launcher``): after an optimizer step and a weight sync, the
engine's log-probs on a video prompt equal the Megatron RL forward's, with one replica of rollout TP=2 fed from
each rank's own shards and with two replicas of rollout TP=1 fed gathered tensors; before any sync they are far off
(a missed sync fails the test). Skipped when vLLM is not importable.

fp32 on CPU, 2 gloo ranks. Tolerance 1e-4; ~60 s per case on 2 cores: the tied cases are marked slow.
"""
import importlib.util

import pytest

from megatron_tr1.demo import tiny_hf_model
from megatron_tr1.launch import run_ranks

import _cases
import _sync_cases

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (README 'Rollouts on CPU')")
LOGPROB_ATOL = 1e-4


@pytest.mark.parametrize("rollout_tp, vision_dp", [(2, False), (1, False), pytest.param(2, True, marks=pytest.mark.slow)],
                         ids=["rollout_tp2_local", "rollout_tp1_two_replicas", "rollout_tp2_vision_whole"])
@pytest.mark.parametrize("tie", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["untied", "tied"])
def test_tp2_sync_into_vllm_on_every_rank(tmp_path, tie, rollout_tp, vision_dp):
    model_dir = _cases.write_model_dir(tiny_hf_model(1, tie_word_embeddings=tie), tmp_path)  # config + tokenizer
    results = run_ranks(_sync_cases.vllm_tp2_sync_case, 2, model_dir, tie, rollout_tp, vision_dp, timeout=600)
    for out in results:
        assert out["before"] > 0.1  # vLLM's dummy weights: the sync is what makes them equal
        assert out["after"] < LOGPROB_ATOL and out["same_tokens"]
        stats = out["stats"]
        assert stats.tensors > 0
        if rollout_tp == 2 and vision_dp:  # the vision tower gathered (vLLM holds it whole), the rest local
            assert stats.local > 0 and stats.collectives > 0
        elif rollout_tp == 2:  # fed from the rank's own shards: nothing crosses between ranks
            assert stats.local > 0 and stats.collectives == 0 and stats.bytes_sent == stats.bytes_received == 0
        else:
            assert stats.local == 0 and stats.collectives > 0 and stats.bytes_received > 0
