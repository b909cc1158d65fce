"""kernels.grpo_loss (Triton, interpreted) against the float64 reference: loss, gradients, statistics."""
import pytest
import torch

import kernels
from kernels import reference

B, T = 5, 13  # T not a power of two; sequence 2 fully masked


def batch(per_token_adv: bool):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, dtype=torch.float64, generator=g)

    logprobs = randn(B, T, scale=0.5) - 1.0
    old = logprobs + randn(B, T, scale=0.4)  # many ratios outside [0.8, 1.28]
    ref = logprobs + randn(B, T, scale=0.6)
    entropy = randn(B, T).abs() * 2
    adv = randn(B, T) if per_token_adv else randn(B)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    adv[0], old[0, :3], mask[0, :3] = -adv[0].abs(), old[0, :3] - 2.0, True  # ratio e^2 > clip_dual with A < 0
    return logprobs, old, adv, mask, ref, entropy


def run(fn, logprobs, old, adv, mask, ref, entropy, **kwargs):
    logprobs, entropy = logprobs.clone().requires_grad_(), entropy.clone().requires_grad_()
    loss, stats = fn(logprobs, old, adv, mask, ref_logprobs=ref, entropy=entropy, **kwargs)
    loss.backward()
    return loss.detach(), logprobs.grad, entropy.grad, stats


@pytest.mark.parametrize("agg", reference.AGG_MODES)
@pytest.mark.parametrize("kl_type", reference.KL_TYPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_matches_float64_reference(agg, kl_type, per_token_adv):
    data = batch(per_token_adv)
    kwargs = dict(clip_low=0.2, clip_high=0.28, clip_dual=3.0, kl_coef=0.1, kl_type=kl_type, entropy_coef=0.01,
                  agg=agg)
    loss, g_lp, g_ent, stats = run(kernels.grpo_loss, *(t.float() for t in data), **kwargs)
    r_loss, r_g_lp, r_g_ent, r_stats = run(reference.grpo_loss, *data, **kwargs)
    assert loss.dtype == g_lp.dtype == torch.float32
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_lp.double(), r_g_lp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ent.double(), r_g_ent, rtol=1e-5, atol=1e-7)
    assert stats.keys() == r_stats.keys()
    for name in stats:
        torch.testing.assert_close(stats[name].double(), r_stats[name].double(), rtol=1e-5, atol=1e-6)
    assert 0 < stats["clip_frac"] < 1 and 0 < stats["clip_frac_dual"] < 1 and stats["kl"] != 0
    assert (g_lp[2] == 0).all() and (g_ent[2] == 0).all()  # the fully masked sequence


def test_sequences_longer_than_one_block():
    g = torch.Generator().manual_seed(1)
    b, t = 3, 1100  # > the 1024-token block, ragged tail
    logprobs = torch.randn(b, t, dtype=torch.float64, generator=g) * 0.5 - 1
    old = logprobs + torch.randn(b, t, dtype=torch.float64, generator=g) * 0.4
    adv, mask = torch.randn(b, dtype=torch.float64, generator=g), torch.rand(b, t, generator=g) > 0.2
    for agg in ("token-mean", "seq-mean-token-mean"):
        lp, lp_ref = logprobs.float().requires_grad_(), logprobs.clone().requires_grad_()
        loss, stats = kernels.grpo_loss(lp, old.float(), adv.float(), mask, clip_high=0.28, agg=agg)
        r_loss, r_stats = reference.grpo_loss(lp_ref, old, adv, mask, clip_high=0.28, agg=agg)
        (loss + r_loss).backward()
        torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lp.grad.double(), lp_ref.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(stats["clip_frac"].double(), r_stats["clip_frac"].double())


def test_without_reference_entropy_or_dual_clip():
    logprobs, old, adv, mask, _, _ = batch(False)
    lp = logprobs.float().requires_grad_()
    loss, stats = kernels.grpo_loss(lp, old.float(), adv.float(), mask, kl_coef=0.5)
    loss.backward()
    lp_ref = logprobs.clone().requires_grad_()
    r_loss, r_stats = reference.grpo_loss(lp_ref, old, adv, mask, kl_coef=0.5)
    r_loss.backward()
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), lp_ref.grad, rtol=1e-5, atol=1e-7)
    assert stats["kl"] == 0 and stats["clip_frac_dual"] == 0


def test_all_masked_gives_zero_loss_and_grad():
    logprobs, old, adv, _, ref, entropy = (t.float() for t in batch(True))
    lp = logprobs.requires_grad_()
    loss, stats = kernels.grpo_loss(lp, old, adv, torch.zeros(B, T), ref_logprobs=ref, kl_coef=0.1,
                                    agg="seq-mean-token-mean")
    loss.backward()
    assert loss == 0 and (lp.grad == 0).all() and all(v == 0 for v in stats.values())


def test_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"advantages \[B\] or \[B, T\]; got \(1, 2\) and \(2,\)"):
        kernels.grpo_loss(x, x, x[0], x)
    with pytest.raises(ValueError, match="agg='token-sum'"):
        kernels.grpo_loss(x, x, x[:, 0], x, agg="token-sum")
    with pytest.raises(ValueError, match="kl_type='k4'"):
        kernels.grpo_loss(x, x, x[:, 0], x, kl_type="k4")
