"""Qwen3-VL in both rollout engines: after a weight sync from the Megatron ``Qwen3VLModel`` (through the conversion
table), the engine samples a timestamped video prompt with the trainer's log-probs (HF engine: transformers'
``Qwen3VLForConditionalGeneration``; vLLM 0.32's Qwen3-VL, started on dummy weights as the trainer starts it).
fp32 on CPU, one rank."""
import importlib.util

import pytest

from megatron_tr1.launch import run_ranks

import _qwen3_vl_engine_cases

LOGPROB_ATOL = 1e-4


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_engine_after_sync_equals_the_trainer(tie):
    out = run_ranks(_qwen3_vl_engine_cases.engine_sync_case, 1, "hf", None, tie, timeout=600)[0]
    assert out["before"] > 0.1 and out["after"] < LOGPROB_ATOL and out["tensors"] > 0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (README 'Rollouts on CPU')")
@pytest.mark.parametrize("tie", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["untied", "tied"])
def test_vllm_engine_after_sync_equals_the_trainer(tmp_path, tie):
    from megatron_tr1.demo import tiny_qwen3_vl_model, write_tiny_model_dir

    model_dir = write_tiny_model_dir(tiny_qwen3_vl_model(1, tie_word_embeddings=tie), tmp_path)
    out = run_ranks(_qwen3_vl_engine_cases.engine_sync_case, 1, "vllm", model_dir, tie, timeout=600)[0]
    assert out["before"] > 0.1 and out["after"] < LOGPROB_ATOL and out["tensors"] > 0
