"""kernels.reference against hand-computed values (the ground truth the kernel tests compare with)."""
import math

import pytest
import torch

from kernels import reference

D = torch.float64


def loss_and_grad(logprobs, old, adv, **kwargs):
    lp = torch.tensor(logprobs, dtype=D, requires_grad=True)
    loss, stats = reference.grpo_loss(lp, torch.tensor(old, dtype=D), torch.tensor(adv, dtype=D),
                                      torch.ones(lp.shape), **kwargs)
    loss.backward()
    return loss.item(), lp.grad.tolist(), {k: v.item() for k, v in stats.items()}


def test_ppo_clip_and_clip_higher():
    lp = [[math.log(1.5), math.log(0.5)]]  # old = 0: ratios 1.5 and 0.5, advantage +1
    loss, grad, stats = loss_and_grad(lp, [[0.0, 0.0]], [1.0])
    assert loss == pytest.approx((-1.2 - 0.5) / 2)  # ratio 1.5 clipped to 1.2; 0.5 is below 1 - 0.2 but A > 0
    assert grad[0] == pytest.approx([0.0, -0.5 / 2])
    assert stats["clip_frac"] == pytest.approx(0.5) and stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ppo_kl"] == pytest.approx(-math.log(0.75) / 2)
    loss, _, _ = loss_and_grad(lp, [[0.0, 0.0]], [1.0], clip_high=0.6)
    assert loss == pytest.approx((-1.5 - 0.5) / 2)


def test_dual_clip_caps_negative_advantage_loss():
    lp, old, adv = [[math.log(4.0)]], [[0.0]], [-1.0]  # ratio 4, A = -1: -A r = 4 > -A (1 + 0.2)
    assert loss_and_grad(lp, old, adv)[:2] == (pytest.approx(4.0), [[pytest.approx(4.0)]])
    loss, grad, stats = loss_and_grad(lp, old, adv, clip_dual=3.0)
    assert (loss, grad, stats["clip_frac_dual"]) == (pytest.approx(3.0), [[0.0]], 1.0)


@pytest.mark.parametrize("kl_type,value,grad", [
    ("k1", -math.log(2), 1.0),
    ("k2", 0.5 * math.log(2) ** 2, -math.log(2)),
    ("low_var_kl", 1 - math.log(2), -1.0),  # ratio = exp(ref - logp) = 2: 2 - log 2 - 1; d/dlogp = 1 - 2
])
def test_kl_penalties(kl_type, value, grad):
    ref = torch.tensor([[math.log(2)]], dtype=D)
    loss, g, stats = loss_and_grad([[0.0]], [[0.0]], [0.0], ref_logprobs=ref, kl_coef=1.0, kl_type=kl_type)
    assert (loss, g[0][0], stats["kl"]) == (pytest.approx(value), pytest.approx(grad), pytest.approx(value))


def test_low_var_kl_is_clamped():
    ref = torch.tensor([[25.0]], dtype=D)  # log-ratio clamped to 20, then the estimate to 10: no gradient
    loss, g, _ = loss_and_grad([[0.0]], [[0.0]], [0.0], ref_logprobs=ref, kl_coef=1.0)
    assert (loss, g) == (10.0, [[0.0]])


@pytest.mark.parametrize("agg,value", [
    ("token-mean", 7 / 3), ("seq-mean-token-mean", (1.5 + 4) / 2), ("seq-mean-token-sum", (3 + 4 + 0) / 3)])
def test_aggregations_with_a_fully_masked_sequence(agg, value):
    loss = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert reference.agg_loss(loss, mask, agg).item() == pytest.approx(value)


def test_logprobs_and_entropy_match_log_softmax():
    logits = torch.randn(6, 11, dtype=D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 10, 3, -100, 5, 7])
    lp, ent = reference.fused_logprobs(logits, labels, 2.0, return_entropy=True)
    log_p = torch.log_softmax(logits / 2.0, -1)
    keep = labels != -100
    torch.testing.assert_close(lp[keep], log_p[keep].gather(-1, labels[keep, None]).squeeze(-1))
    torch.testing.assert_close(ent[keep], -(log_p.exp() * log_p).sum(-1)[keep])
    assert lp[3] == 0 and ent[3] == 0
