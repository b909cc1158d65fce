"""Megatron TP=2 -> ``VLLMEngine`` held by rank 0 alone: after an optimizer step and a weight sync, the engine's
log-probs on a video prompt equal the Megatron RL forward's. Skipped when vLLM is not importable.

fp32 on CPU, 2 gloo ranks. vLLM runs in-process on rank 0 with a default process group of its own
(``VLLMEngine._own_default_group``: with the trainer's it would block in ``new_group``). Tolerance 1e-4; the step
moves the log-probs by > 1e-3. ~60 s per case on 2 cores: the tied case is marked slow.
"""
import importlib.util

import pytest

from megatron_tr1.launch import run_ranks
from megatron_tr1.demo import tiny_hf_model

import _cases
import _sync_cases

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (README 'Rollouts on CPU')")
LOGPROB_ATOL = 1e-4


@pytest.mark.parametrize("tie", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["untied", "tied"])
def test_tp2_sync_into_vllm_on_rank0_matches_policy(tmp_path, tie):
    model_dir = _cases.write_model_dir(tiny_hf_model(1, tie_word_embeddings=tie), tmp_path)  # other weights
    results = run_ranks(_sync_cases.vllm_tp2_sync_case, 2, model_dir, tie)
    ours = results[0]
    assert ours["stats"].tensors > 0 and results[1]["stats"].tensors == 0  # rank 1 holds no engine
    assert ours["max_diff"] < LOGPROB_ATOL
    assert ours["step_change"] > 1e-3
