"""A short GRPO run on a tiny Qwen3-VL (``model.tiny.family=qwen3_vl``): every stage trains through the Qwen3-VL
Megatron model, the HF engine samples timestamped prompts with the trainer's log-probs, the run evaluates."""
from megatron_tr1.launch import run_ranks

from tests.rl import _trainer_cases


def test_tiny_qwen3_vl_trains_base_sft_and_grpo(tmp_path):
    out = run_ranks(_trainer_cases.qwen3_vl_run_case, 1, str(tmp_path / "run"), timeout=600)[0]
    assert out["model_type"] == "qwen3_vl"
    assert [r["step"] for r in out["grpo"]] == [1, 2]
    for r in out["grpo"]:
        assert r["logprob_mismatch/max"] < 1e-5  # engine (transformers Qwen3-VL) vs trainer (Megatron) after sync
        assert r["grad_norm"] > 0 and r["batch/tokens"] > 0
    assert {"base", "sft", "grpo"} <= out["results"].keys()
