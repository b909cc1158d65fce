"""Rollouts on every rank (``rollout.placement``): how prompts are cut into replica slices, and tiny ``tr1 train`` runs
where every rank generates: two replicas (DP=2) sample and learn what one replica does over the same prompts, dynamic
sampling's refill rounds stay in step across ranks, and TP=2 with vLLM at rollout TP=2 trains with the engine's
log-probs equal to the trainer's."""
import importlib.util
import shutil

import numpy as np
import pytest

from megatron_tr1.errors import ConfigError
from megatron_tr1.launch import run_ranks
from megatron_tr1.rollout.placement import ReplicaLayout, split

from tests.rollout import _placement_cases as cases

NO_DYNAMIC = "algorithm.dynamic_sampling=false"


def test_split_and_layout():
    assert [list(r) for r in split(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in split(2, 4)] == [[0], [1], [], []]
    lay = ReplicaLayout(world=8, rank=5, tp=2)
    assert (lay.replicas, lay.replica, lay.leader) == (4, 2, False)
    with pytest.raises(ConfigError, match="rollout.tensor_parallel=3 must divide the world size 8"):
        ReplicaLayout(world=8, rank=0, tp=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_tr1.data import synthetic

    root = tmp_path_factory.mktemp("placement")
    synthetic.generate(root / "data", 8, num_test=4, num_ood=2, num_pretrain=4, size=56, progress=False)
    return root


def _run(data, name, world, *extra):
    shutil.copytree(data / "data", data / name / "data")  # the same videos for every run (H.264 is not repeatable)
    return run_ranks(cases.train_case, world, str(data / name), *extra, timeout=900)


def test_two_replicas_equal_one_over_the_same_prompts(data):
    """DP=2 (two HF engines, each generating its own prompt) against one rank generating both: the same samples
    (seeds follow the prompt's index in the step), hence the same update: equal gradient norms and weights."""
    (one,) = _run(data, "one", 1, NO_DYNAMIC)
    two = _run(data, "two", 2, NO_DYNAMIC)
    a, b = one["metrics"]["grpo"], two[0]["metrics"]["grpo"]
    assert [r["rollout/replicas"] for r in a] == [1, 1] and [r["rollout/replicas"] for r in b] == [2, 2]
    assert np.allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4)
    worst = max(np.abs(one["weights"][k] - two[0]["weights"][k]).max() for k in one["weights"])
    assert worst < 1e-5
    assert all(r["rollout/tokens_per_s_per_gpu"] > 0 for r in b)


def test_dynamic_sampling_rounds_stay_in_step_across_ranks(data):
    """With dynamic sampling each rank keeps drawing until every rank has its groups (a rank that has enough still
    takes its refill, so sampler positions stay equal): the run finishes, and both ranks logged the same steps."""
    results = _run(data, "dynamic", 2)
    assert all(r["status"] == "done" for r in results)
    assert len(results[0]["metrics"]["grpo"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (README 'Rollouts on CPU')")
def test_tp2_training_with_vllm_rollout_tp2(data):
    """Megatron TP=2 and vLLM at rollout TP=2 on the same 2 ranks: both ranks are workers of one replica, fed from
    their own shards, and the engine's log-probs of the sampled tokens equal the trainer's (fp32)."""
    results = _run(data, "vllm", 2, "model.tensor_parallel=2", "rollout.engine=vllm", "rollout.tensor_parallel=2",
                   "model.tiny.hidden_size=128", "model.tiny.intermediate_size=256")  # vLLM CPU: head_dim >= 32
    grpo = results[0]["metrics"]["grpo"]
    assert results[0]["status"] == "done" and len(grpo) == 2
    assert all(r["logprob_mismatch/max"] < 1e-4 for r in grpo)
    assert all(r["rollout/replicas"] == 1 and r["sync/bytes_received"] == r["sync/bytes_per_rank"] == 0 for r in grpo)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (README 'Rollouts on CPU')")
def test_pp2_training_into_vllm_rollout_tp2(data):
    """Megatron PP=2 (one layer per stage) feeding vLLM at rollout TP=2: the stages broadcast their buckets, each
    vLLM rank keeps its slice, and the log-probs still match."""
    results = _run(data, "vllm_pp2", 2, "model.pipeline_parallel=2", "model.tiny.num_layers=2",
                   "rollout.engine=vllm", "rollout.tensor_parallel=2", "model.tiny.hidden_size=128",
                   "model.tiny.intermediate_size=256")
    grpo = results[-1]["metrics"]["grpo"]
    assert results[0]["status"] == "done" and all(r["logprob_mismatch/max"] < 1e-4 for r in grpo)
    assert all(r["sync/bytes_received"] > 0 or r["sync/bytes_sent"] > 0 for r in grpo)
    assert all(r["sync/bytes_per_rank"] == r["sync/bytes_received"] + r["sync/bytes_sent"] for r in grpo)
