"""GSPO, CISPO, the rollout corrections (TIS / MIS / seq-MIS) and Dr. GRPO's ``seq-mean-token-sum-norm`` in
``kernels.grpo_loss`` (Triton, interpreted) and ``kernels.reference.grpo_loss``, each against a float64 formula
written out here token by token (no autograd): loss, gradients, and the statistics of the two against each other.

The batch is ragged (rows of different lengths, holes, one row fully masked); rollout log-probs are off by ~0.5 nat
with one row off by more than ``log(cap)`` on average (seq-MIS drops it), and one row's GSPO ratio is far outside the
clip range. ``grpo_loss`` takes no TP group (its inputs are per-token log-probs, already reduced over the vocab
shards), so there is no TP case here.
"""
import math

import pytest
import torch

import kernels
from kernels import reference

B, T, NORM_LEN, CAP = 6, 11, 16, 2.0
CLIP_LOW, CLIP_HIGH, KL_COEF, ENT_COEF = 0.2, 0.28, 0.1, 0.01


def batch(per_token_adv: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    lengths = [11, 7, 0, 4, 9, 1]  # ragged; row 2 fully masked
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    mask[0, 3] = mask[4, 5] = False  # holes
    logprobs = 0.5 * randn(B, T) - 1.0
    old = logprobs + 0.3 * randn(B, T)
    old[4] -= 0.6  # GSPO: this sequence's ratio ~exp(0.6), clipped
    rollout = old + 0.5 * randn(B, T)
    rollout[3] -= 1.5  # seq-MIS: this sequence's geometric-mean ratio ~exp(1.5) > CAP
    ref = logprobs + 0.4 * randn(B, T)
    entropy = 2 * randn(B, T).abs()
    adv = randn(B, T) if per_token_adv else randn(B)
    adv[4] = adv[4].abs() + 0.5  # positive advantage with the large ratio: clipped
    return logprobs, old, adv, mask, rollout, ref, entropy


def agg_weights(m: torch.Tensor, agg: str) -> torch.Tensor:
    """Per-token weights W with ``agg(x) = sum(W * x)`` over the kept-token mask ``m``."""
    counts = m.sum(-1)
    if agg == "token-mean":
        return m / m.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return m / counts.clamp(min=1)[:, None] / (counts > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        return m / B
    assert agg == "seq-mean-token-sum-norm"
    return m / (B * NORM_LEN)  # Dr. GRPO: token sums over a constant length, averaged over sequences


def formula(logprobs, old, adv, mask, rollout, ref, entropy, *, loss_type, correction, agg):
    """(loss, d loss / d logprobs, d loss / d entropy) in float64, with k2 KL and the entropy bonus."""
    lp, a = logprobs, (adv[:, None].expand(B, T) if adv.dim() == 1 else adv)
    m = mask.double()
    rho = torch.exp(old - rollout)
    if correction == "mis":
        m = m * ((rho >= 1 / CAP) & (rho <= CAP))
    if correction == "seq-mis":
        geo = torch.exp(((old - rollout) * m).sum(-1) / m.sum(-1).clamp(min=1))
        m = m * ((geo >= 1 / CAP) & (geo <= CAP))[:, None]
    tis = torch.clamp(rho, max=CAP) if correction == "tis" else torch.ones_like(rho)

    def clip(r):
        return torch.clamp(r, 1 - CLIP_LOW, 1 + CLIP_HIGH)

    if loss_type == "cispo":
        pg, dpg = -clip(torch.exp(lp - old)) * a * lp, -clip(torch.exp(lp - old)) * a
    else:
        if loss_type == "gspo":  # one ratio per sequence: exp(mean log-ratio over its kept tokens)
            r = torch.exp(((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1))[:, None].expand(B, T)
        else:
            r = torch.exp(lp - old)
        unclipped, clipped = -a * r, -a * clip(r)
        pg = torch.maximum(unclipped, clipped)
        dpg = torch.where(clipped > unclipped, 0.0, -a * r)  # GSPO: d r / d logp_t = r too
    w_pg = agg_weights(m, "seq-mean-token-mean" if loss_type == "gspo" else agg)
    w = agg_weights(m, agg)
    loss = (w_pg * tis * pg).sum() + KL_COEF * (w * 0.5 * (lp - ref) ** 2).sum() - ENT_COEF * (w * entropy).sum()
    return loss, w_pg * tis * dpg + KL_COEF * w * (lp - ref), -ENT_COEF * w


def run(fn, data, cast, **kwargs):
    logprobs, old, adv, mask, rollout, ref, entropy = data
    lp, ent = cast(logprobs).requires_grad_(), cast(entropy).requires_grad_()
    loss, stats = fn(lp, cast(old), cast(adv), mask, ref_logprobs=cast(ref), entropy=ent, kl_type="k2",
                     kl_coef=KL_COEF, entropy_coef=ENT_COEF, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                     rollout_logprobs=cast(rollout), rollout_cap=CAP, agg_norm_len=NORM_LEN, **kwargs)
    loss.backward()
    return loss.detach().double(), lp.grad.double(), ent.grad.double(), stats


# every loss type with every correction; the aggregations rotate so each loss type meets all four
CASES = [(loss_type, correction, reference.AGG_MODES[(i + j) % len(reference.AGG_MODES)])
         for i, loss_type in enumerate(reference.LOSS_TYPES)
         for j, correction in enumerate(reference.ROLLOUT_CORRECTIONS)]


@pytest.mark.parametrize("loss_type,correction,agg", CASES)
def test_kernel_and_reference_match_the_formula(loss_type, correction, agg):
    data = batch(per_token_adv=agg == "seq-mean-token-sum")
    kwargs = dict(loss_type=loss_type, rollout_correction=correction, agg=agg)
    want_loss, want_g_lp, want_g_ent = formula(*data, loss_type=loss_type, correction=correction, agg=agg)
    k_loss, k_g_lp, k_g_ent, k_stats = run(kernels.grpo_loss, data, lambda x: x.float(), **kwargs)
    r_loss, r_g_lp, r_g_ent, r_stats = run(reference.grpo_loss, data, lambda x: x.clone(), **kwargs)
    for loss, g_lp, g_ent, rtol in ((k_loss, k_g_lp, k_g_ent, 1e-5), (r_loss, r_g_lp, r_g_ent, 1e-12)):
        torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=1e-6 if rtol > 1e-6 else 1e-14)
        torch.testing.assert_close(g_lp, want_g_lp, rtol=rtol, atol=1e-7 if rtol > 1e-6 else 1e-14)
        torch.testing.assert_close(g_ent, want_g_ent, rtol=rtol, atol=1e-7 if rtol > 1e-6 else 1e-14)
    assert k_stats.keys() == r_stats.keys()
    for name in r_stats:
        torch.testing.assert_close(k_stats[name].double(), r_stats[name].double(), rtol=1e-5, atol=1e-6)
    assert (k_g_lp[2] == 0).all() and (k_g_ent[2] == 0).all()  # the fully masked row
    # the batch exercises the option
    removed = {"mis": (0.05, 0.6), "seq-mis": (0.05, 0.6)}.get(correction, (0.0, 0.0))
    assert removed[0] <= k_stats["rc_masked_frac"] <= removed[1]
    if correction == "seq-mis":
        assert (k_g_lp[3] == 0).all()  # the whole sequence dropped: in no term
    if correction == "tis":
        rho = torch.clamp(torch.exp(data[1] - data[4]), max=CAP)[data[3]]
        assert abs(k_stats["rc_weight_mean"].item() - rho.mean().item()) < 1e-5 and rho.max() == CAP
    else:
        assert k_stats["rc_weight_mean"] == 1.0
    assert 0 < k_stats["clip_frac"] < 1


def test_gspo_clips_whole_sequences():
    """With GSPO's own small clip range every token of a sequence shares one clip decision."""
    data = batch()
    _, g_lp, _, stats = run(kernels.grpo_loss, data, lambda x: x.float(), loss_type="gspo", agg="token-mean")
    lp, old, mask = data[0], data[1], data[3]
    ratio = torch.exp(((lp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    for row in range(B):
        if mask[row].any():
            moving = g_lp[row][mask[row]] != 0
            assert moving.all() or not moving.any()
    torch.testing.assert_close(stats["ratio_mean"].double(),
                               (ratio[:, None] * mask).sum() / mask.sum(), rtol=1e-5, atol=0)


def test_none_is_bit_equal_to_the_defaults():
    """``loss_type="grpo"``, ``rollout_correction="none"`` (rollout log-probs given or not) is today's loss, bit for
    bit: the option's code is compiled out and the kernel's sums are reduced in today's order."""
    logprobs, old, adv, mask, rollout, ref, entropy = (t.float() if t.is_floating_point() else t for t in batch())
    outs = []
    for extra in ({}, dict(loss_type="grpo", rollout_logprobs=rollout, rollout_correction="none", rollout_cap=5.0)):
        for fn in (kernels.grpo_loss, reference.grpo_loss):
            lp, ent = logprobs.clone().requires_grad_(), entropy.clone().requires_grad_()
            loss, stats = fn(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, kl_coef=0.1, entropy_coef=0.01,
                             clip_dual=3.0, **extra)
            loss.backward()
            outs.append((loss, lp.grad, ent.grad, stats))
    for a, b in ((outs[0], outs[2]), (outs[1], outs[3])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])
        assert a[3]["rc_weight_mean"] == 1.0 and a[3]["rc_masked_frac"] == 0.0


def test_sequences_longer_than_one_block():
    g = torch.Generator().manual_seed(1)
    b, t = 3, 1100  # > the 1024-token block of both passes, ragged tail
    logprobs = torch.randn(b, t, dtype=torch.float64, generator=g) * 0.5 - 1
    old = logprobs + torch.randn(b, t, dtype=torch.float64, generator=g) * 0.05
    rollout = old + torch.randn(b, t, dtype=torch.float64, generator=g) * 0.5
    rollout[1] -= 1.0
    adv, mask = torch.randn(b, dtype=torch.float64, generator=g), torch.rand(b, t, generator=g) > 0.2
    for loss_type, correction in (("gspo", "seq-mis"), ("cispo", "mis"), ("gspo", "tis")):
        kw = dict(loss_type=loss_type, rollout_correction=correction, agg="token-mean")
        lp, lp_ref = logprobs.float().requires_grad_(), logprobs.clone().requires_grad_()
        loss, stats = kernels.grpo_loss(lp, old.float(), adv.float(), mask, rollout_logprobs=rollout.float(), **kw)
        r_loss, r_stats = reference.grpo_loss(lp_ref, old, adv, mask, rollout_logprobs=rollout, **kw)
        (loss + r_loss).backward()
        torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lp.grad.double(), lp_ref.grad, rtol=1e-5, atol=1e-8)
        for name in ("rc_masked_frac", "rc_weight_mean", "ratio_mean"):
            torch.testing.assert_close(stats[name].double(), r_stats[name].double(), rtol=1e-5, atol=1e-7)
        assert (stats["rc_masked_frac"] > 0.2) == (correction != "tis")


def test_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        kernels.grpo_loss(x, x, x[:, 0], x, loss_type="ppo")
    with pytest.raises(ValueError, match="rollout_correction='is'"):
        kernels.grpo_loss(x, x, x[:, 0], x, rollout_correction="is")
    with pytest.raises(ValueError, match=r"rollout_correction='tis' needs rollout_logprobs of shape \(2, 3\).*None"):
        kernels.grpo_loss(x, x, x[:, 0], x, rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_cap=1.0 must be > 1 for rollout_correction='mis'"):
        kernels.grpo_loss(x, x, x[:, 0], x, rollout_correction="mis", rollout_logprobs=x, rollout_cap=1.0)
    with pytest.raises(ValueError, match="clip_dual=3.0 applies to loss_type='grpo' only"):
        kernels.grpo_loss(x, x, x[:, 0], x, loss_type="gspo", clip_dual=3.0)
    with pytest.raises(ValueError, match="agg_norm_len=0"):
        kernels.grpo_loss(x, x, x[:, 0], x, agg="seq-mean-token-sum-norm", agg_norm_len=0)
    assert math.isfinite(kernels.grpo_loss(x, x, x[:, 0], x, agg="seq-mean-token-sum-norm")[0].item())
