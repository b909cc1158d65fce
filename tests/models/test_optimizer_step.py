"""One optimizer step through megatron's DDP + Adam (``wrap_ddp_and_optimizer``) equals AdamW on HF.

fp32 on CPU, 2 gloo ranks; the step uses lr 1e-3, weight decay 0.1 (not on biases / 1-D tensors), clip
at global grad norm 1.0 (the grads' norm is ~12, so clipping is active). The reference is
``torch.optim.AdamW`` + ``clip_grad_norm_`` on the HF model with the gradient of the mean loss over every
rank's batch (what DDP's averaged gradient is). Tolerances: parameters, compared through
``convert.mapping``, within 1e-5 absolute (1% of one step's size lr; measured <= 3e-6: fp32 grad noise
on near-zero gradients, which Adam's normalisation amplifies); megatron's global grad norm within 1e-5
relative of HF's total norm (measured <= 3e-6); logits after the step within 1e-5 (measured 2e-6) while
the step itself moves them by > 1e-3. The world starts once per module; the tests assert on its parts.
"""
import numpy as np
import pytest

from megatron_tr1.launch import run_ranks
from megatron_tr1.demo import tiny_hf_config

import _optimizer_cases as cases

PARAM_ATOL = 1e-5
NORM_RTOL = 1e-5
LOGIT_ATOL = 1e-5
CLIP = 1.0


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(cases.two_rank_suite, 2)


def _max_param_diff(ours: dict, ref: dict) -> tuple[float, str]:
    assert ours.keys() == ref.keys() and len(ours) > 80  # every tensor, vision tower included
    diffs = {n: float(np.abs(ours[n] - ref[n]).max()) for n in ours}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def _check_norm(results):
    for r in results:
        assert r["update_ok"]
        assert results[0]["hf_grad_norm"] > CLIP  # the step was clipped
        assert abs(r["grad_norm"] - results[0]["hf_grad_norm"]) < NORM_RTOL * results[0]["hf_grad_norm"]


@pytest.mark.parametrize("case", ["dp2_distopt", "dp2_plain"])
def test_dp2_step_is_identical_on_ranks_and_equals_adamw_on_averaged_grads(two_ranks, case):
    results = [r[case] for r in two_ranks]
    config = tiny_hf_config()
    ranks = [cases.mapped(r["params"], config, 1) for r in results]
    assert all(np.array_equal(ranks[0][n], ranks[1][n]) for n in ranks[0])  # replicas stay identical
    diff, worst = _max_param_diff(ranks[0], results[0]["hf_params"])
    assert diff < PARAM_ATOL, f"{worst}: {diff:.2e}"
    moved, _ = _max_param_diff(results[0]["hf_initial"], results[0]["hf_params"])
    assert moved > 0.5 * cases.LR  # the reference step is a real step
    _check_norm(results)


@pytest.mark.parametrize("case", ["tp2_plain", "tp2_distopt"])
def test_tp2_clipped_step_equals_hf_logits_params_and_grad_norm(two_ranks, case):
    results = [r[case] for r in two_ranks]
    ours = cases.mapped({k: v for r in results for k, v in r["params"].items()}, tiny_hf_config(tie_word_embeddings=True), 2)
    diff, worst = _max_param_diff(ours, results[0]["hf_params"])
    assert diff < PARAM_ATOL, f"{worst}: {diff:.2e}"
    for r in results:
        assert r["logits_diff"] < LOGIT_ATOL
        assert r["logits_change"] > 1e-3
    _check_norm(results)
