"""Fused GRPO / PPO-clip loss (Triton): one pass computes the loss, its gradients and the statistics.

Per token, with ``r = exp(clamp(logp - old, -20, 20))`` and advantage ``A``:
``pg = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))``, with dual clip ``pg = min(pg, -A clip_dual)``
where ``A < 0``; plus ``kl_coef * KL(logp, ref)`` (verl's k1 / k2 / low_var_kl) minus ``entropy_coef *
entropy``. Every aggregation is linear in the token losses, so it is a per-token weight ``mask * row_scale[b]``
(``row_scales``); the kernel (one program per sequence) writes the weighted per-token gradients and per-sequence
sums, and backward only scales the saved gradients by the upstream scalar. Gradient conventions match autograd on
``kernels.reference.grpo_loss`` except at exact ties of the clip branches (measure zero).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import triton_kernel, use_triton

BLOCK_T = 1024
_KL_CODE = {"k1": 1, "k2": 2, "low_var_kl": 3}
STAT_NAMES = ("clip_frac", "clip_frac_dual", "ppo_kl", "kl", "ratio_mean")


@triton_kernel
def _grpo_kernel(lp_ptr, old_ptr, adv_ptr, adv_stride_b, adv_stride_t, mask_ptr, scale_ptr, ref_ptr, ent_ptr,
                 grad_lp_ptr, grad_ent_ptr, sums_ptr, T, clip_low, clip_high, clip_dual, kl_coef, ent_coef,
                 DUAL: tl.constexpr, KL: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    scale = tl.load(scale_ptr + b)
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_clip = tl.zeros((BLOCK,), tl.float32)
    acc_dual = tl.zeros((BLOCK,), tl.float32)
    acc_ppo_kl = tl.zeros((BLOCK,), tl.float32)
    acc_kl = tl.zeros((BLOCK,), tl.float32)
    acc_ratio = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, T, BLOCK):
        t = off + tl.arange(0, BLOCK)
        inside = t < T
        m = tl.load(mask_ptr + base + t, mask=inside, other=0.0)
        on = m != 0
        w = m * scale
        lp = tl.load(lp_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + b.to(tl.int64) * adv_stride_b + t * adv_stride_t, mask=inside,
                      other=0.0).to(tl.float32)
        d = lp - old
        log_ratio = tl.minimum(tl.maximum(d, -20.0), 20.0)
        ratio = tl.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        clipped = pg2 > pg1
        pg = tl.maximum(pg1, pg2)
        dpg = tl.where(clipped | (d < -20.0) | (d > 20.0), 0.0, pg1)  # d(-A r)/d logp = -A r
        if DUAL:
            pg3 = -adv * clip_dual
            dual = (pg > pg3) & (adv < 0)
            pg = tl.where(adv < 0, tl.minimum(pg, pg3), pg)
            dpg = tl.where(dual, 0.0, dpg)
            acc_dual += tl.where(on & dual, m, 0.0)
        kl = tl.zeros_like(lp)
        dkl = tl.zeros_like(lp)
        if KL != 0:
            ref = tl.load(ref_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
            if KL == 1:
                kl = lp - ref
                dkl += 1.0
            elif KL == 2:
                kl = 0.5 * (lp - ref) * (lp - ref)
                dkl = lp - ref
            else:
                x = ref - lp
                xc = tl.minimum(tl.maximum(x, -20.0), 20.0)
                r = tl.exp(xc)
                k3 = r - xc - 1.0
                kl = tl.minimum(tl.maximum(k3, -10.0), 10.0)
                inner = (x >= -20.0) & (x <= 20.0) & (k3 >= -10.0) & (k3 <= 10.0)
                dkl = tl.where(inner, 1.0 - r, 0.0)
        loss = pg + kl_coef * kl
        if HAS_ENT:
            loss -= ent_coef * tl.load(ent_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
            tl.store(grad_ent_ptr + base + t, -ent_coef * w, mask=inside)
        tl.store(grad_lp_ptr + base + t, tl.where(on, w * (dpg + kl_coef * dkl), 0.0), mask=inside)
        acc_loss += tl.where(on, w * loss, 0.0)
        acc_clip += tl.where(on & clipped, m, 0.0)
        acc_ppo_kl += tl.where(on, -m * log_ratio, 0.0)
        acc_kl += tl.where(on, m * kl, 0.0)
        acc_ratio += tl.where(on, m * ratio, 0.0)
    out = sums_ptr + b * 6
    tl.store(out, tl.sum(acc_loss, 0))
    tl.store(out + 1, tl.sum(acc_clip, 0))
    tl.store(out + 2, tl.sum(acc_dual, 0))
    tl.store(out + 3, tl.sum(acc_ppo_kl, 0))
    tl.store(out + 4, tl.sum(acc_kl, 0))
    tl.store(out + 5, tl.sum(acc_ratio, 0))


def row_scales(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Per-sequence weight ``[B]`` such that ``agg_loss(x, mask, agg) == sum(x * mask * row_scales[:, None])``."""
    counts = mask.sum(-1)
    if agg == "token-mean":
        return (1.0 / counts.sum().clamp(min=1)).expand_as(counts).contiguous()
    if agg == "seq-mean-token-sum":
        return torch.full_like(counts, 1.0 / counts.numel())
    if agg == "seq-mean-token-mean":
        return 1.0 / (counts.clamp(min=1) * (counts > 0).sum().clamp(min=1))
    raise ValueError(f"agg={agg!r}: expected one of {reference.AGG_MODES}")


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, entropy, old, adv, mask, ref, clip_low, clip_high, clip_dual, kl_coef, kl_type,
                entropy_coef, agg):
        B, T = logprobs.shape
        scales = row_scales(mask, agg)
        grad_lp = torch.empty(B, T, dtype=torch.float32, device=logprobs.device)
        grad_ent = torch.empty_like(grad_lp) if entropy is not None else None
        sums = torch.empty(B, 6, dtype=torch.float32, device=logprobs.device)
        if B:
            _grpo_kernel[(B,)](
                logprobs, old, adv, adv.stride(0), adv.stride(1) if adv.dim() == 2 else 0, mask, scales,
                ref if ref is not None else old, entropy if entropy is not None else old,  # unread placeholders
                grad_lp, grad_ent if grad_ent is not None else grad_lp, sums, T, clip_low, clip_high,
                clip_dual or 0.0, kl_coef, entropy_coef,
                DUAL=clip_dual is not None, KL=_KL_CODE[kl_type] if ref is not None else 0,
                HAS_ENT=entropy is not None, BLOCK=min(BLOCK_T, triton.next_power_of_2(max(T, 1))))
        ctx.save_for_backward(grad_lp, grad_ent)
        ctx.dtypes = (logprobs.dtype, entropy.dtype if entropy is not None else None)
        totals = sums.sum(0)
        denom = mask.sum().clamp(min=1)
        stats = {name: totals[i + 1] / denom for i, name in enumerate(STAT_NAMES)}
        ctx.mark_non_differentiable(*stats.values())
        return (totals[0], *stats.values())

    @staticmethod
    def backward(ctx, g_loss, *_):
        grad_lp, grad_ent = ctx.saved_tensors
        lp_dtype, ent_dtype = ctx.dtypes
        g_ent = (grad_ent * g_loss).to(ent_dtype) if grad_ent is not None else None
        return (grad_lp * g_loss).to(lp_dtype), g_ent, *([None] * 11)


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
              clip_dual=None, kl_coef=0.0, kl_type="low_var_kl", entropy=None, entropy_coef=0.0,
              agg="token-mean"):
    """GRPO loss of ``[B, T]`` token log-probs; returns ``(loss, stats)``.

    ``advantages`` ``[B]`` (per sequence) or ``[B, T]``; ``mask`` ``[B, T]`` (bool or 0/1); ``clip_low`` /
    ``clip_high``: asymmetric ratio clip (clip-higher); ``clip_dual``: verl's ``clip_ratio_c`` for ``A < 0``
    (None = off); ``kl_type``: ``k1`` / ``k2`` / ``low_var_kl`` against ``ref_logprobs`` (the KL term is skipped
    when ``ref_logprobs`` is None); ``entropy``: per-token entropy, subtracted with ``entropy_coef``; ``agg``:
    ``token-mean`` / ``seq-mean-token-mean`` / ``seq-mean-token-sum`` (as ``kernels.reference.agg_loss``).
    ``loss`` is a 0-d float32 tensor with gradients to ``logprobs`` and ``entropy``. ``stats``: 0-d float32
    tensors (no host sync; call ``.item()`` when logging), each a mean over unmasked tokens: ``clip_frac``
    (ratio clipped), ``clip_frac_dual`` (dual clip active), ``ppo_kl`` (old - new log-prob), ``kl`` (the KL
    penalty term, 0 without a reference) and ``ratio_mean``.
    """
    if logprobs.dim() != 2 or advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"grpo_loss: logprobs must be [B, T] and advantages [B] or [B, T]; got "
                         f"{tuple(logprobs.shape)} and {tuple(advantages.shape)}")
    if agg not in reference.AGG_MODES:
        raise ValueError(f"grpo_loss: agg={agg!r}; expected one of {reference.AGG_MODES}")
    if kl_type not in reference.KL_TYPES:
        raise ValueError(f"grpo_loss: kl_type={kl_type!r}; expected one of {reference.KL_TYPES}")
    kwargs = dict(ref_logprobs=ref_logprobs, clip_low=clip_low, clip_high=clip_high, clip_dual=clip_dual,
                  kl_coef=kl_coef, kl_type=kl_type, entropy=entropy, entropy_coef=entropy_coef, agg=agg)
    if not use_triton("grpo_loss", logprobs, old_logprobs, advantages, ref_logprobs, entropy):
        return reference.grpo_loss(logprobs, old_logprobs, advantages, mask, **kwargs)

    def prep(x):
        return None if x is None else x.contiguous()

    loss, *stats = _GRPOLoss.apply(
        prep(logprobs), prep(entropy), prep(old_logprobs), prep(advantages), mask.to(torch.float32).contiguous(),
        prep(ref_logprobs), float(clip_low), float(clip_high), None if clip_dual is None else float(clip_dual),
        float(kl_coef), kl_type, float(entropy_coef), agg)
    return loss, dict(zip(STAT_NAMES, stats))
