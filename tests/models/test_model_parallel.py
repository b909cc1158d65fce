"""The megatron-core Qwen2.5-VL equals HF transformers on the same weights, at TP1, TP2, PP2 (TP2 x PP2 slow).

fp32 on CPU. Tolerances: logits, log-probs and entropies 1e-5 absolute (logit scale ~1; measured <= 2e-6);
every parameter gradient, mapped back to its HF name through ``convert.mapping``, within 2e-5 of the HF
gradient relative to that gradient's largest entry (measured <= 1e-6). Rank start-up dominates the time,
so each world size runs once per module (``one_rank`` / ``two_ranks`` fixtures) and the tests assert on
its parts.
"""
import pytest

from megatron_tr1.launch import run_ranks
from megatron_tr1.demo import tiny_hf_config

import _parallel_cases as cases

LOGIT_ATOL = 1e-5
GRAD_RTOL = 2e-5


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(cases.one_rank_suite, 1)


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(cases.two_rank_suite, 2)


def _check_grads(results, key, hf_key, tp, pp, **config_kwargs):
    rank_grads = {k: v for r in results for k, v in r[key].items()}
    errors = cases.compare_grads(rank_grads, tiny_hf_config(**config_kwargs), tp, pp, results[0][hf_key])
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, f"{worst}: relative grad error {errors[worst]:.2e}"
    assert len(errors) > 40  # every tensor of the model was compared, vision tower included


def _check_tp(results, tp, tie, kv):
    for r in results:
        assert r["logits_diff_video=False"] < LOGIT_ATOL
        assert r["logits_diff_video=True"] < LOGIT_ATOL
        assert r["logprob_diff"] < LOGIT_ATOL
        assert r["entropy_diff"] < LOGIT_ATOL
    _check_grads(results, "ce_grads", "hf_ce_grads", tp, 1, tie_word_embeddings=tie, num_key_value_heads=kv)
    _check_grads(results, "rl_grads", "hf_rl_grads", tp, 1, tie_word_embeddings=tie, num_key_value_heads=kv)


def test_tp1_untied_logits_grads_and_rl_logprobs_equal_hf(one_rank):
    _check_tp([r["tp1"] for r in one_rank], 1, False, 2)


def test_tp1_tied_single_query_group_equals_hf(one_rank):
    _check_tp([r["tp1_gqa1_tied"] for r in one_rank], 1, True, 1)


def test_tp2_tied_logits_grads_and_rl_logprobs_equal_hf(two_ranks):
    _check_tp([r["tp2"] for r in two_ranks], 2, True, 2)


def _check_pipeline(results, tp, tie):
    last = [r for r in results if not r["first"]]
    assert len(last) == tp
    for r in last:
        assert r["logits_diff"] < LOGIT_ATOL
        assert abs(r["loss"] - r["hf_loss"]) < 1e-5
    _check_grads(results, "grads", "hf_grads", tp, 2, tie_word_embeddings=tie)


def test_pp2_1f1b_logits_loss_and_grads_equal_hf(two_ranks):
    _check_pipeline([r["pp2"] for r in two_ranks], 1, False)


@pytest.mark.slow
def test_tp2_pp2_tied_equals_hf():
    """4 ranks on 2 cores (~2 min): ``pytest -m slow tests/models``."""
    _check_pipeline(run_ranks(cases.pp_case, 4, 2, True), 2, True)


def test_vision_segments_as_batch_rows_equal_the_block_diagonal_mask(one_rank):
    r = one_rank[0]["segments"]
    assert r["out"] < 1e-5 and r["grad"] < 1e-5, r
    assert r["equal_lengths_mask"] is None  # same-sized frames: no mask at all


def test_freeze_switches_stop_gradients(one_rank):
    parts = {"vision_tower": ("vision.patch_embed.", "vision.decoder."), "merger": ("vision.merger.",),
             "language_model": ("language_model.",)}
    for switch, state in one_rank[0]["freeze"].items():
        assert any(not rg for rg, _ in state.values()) and any(rg for rg, _ in state.values())
        for name, (requires_grad, has_grad) in state.items():
            frozen = name.startswith(parts[switch])
            assert requires_grad is not frozen and has_grad is not frozen, (switch, name)
