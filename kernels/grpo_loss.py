"""Fused GRPO / GSPO / CISPO loss (Triton): one pass computes the loss, its gradients and the statistics.

Per token, with ``r = exp(clamp(logp - old, -20, 20))`` and advantage ``A``, the policy term ``pg`` is
- ``grpo``: ``max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))``, with dual clip ``pg = min(pg, -A clip_dual)``
  where ``A < 0``;
- ``gspo``: the same clip of the sequence's ratio ``s = exp(mean of logp - old over its tokens)`` (the log clamped
  at 10), with the gradient of ``exp(logp - sg(logp) + sg(log s))`` (verl's ``compute_policy_loss_gspo``);
- ``cispo``: ``-sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp``;
times the rollout-correction weight (``tis``: ``min(exp(old - rollout), cap)``, detached), plus ``kl_coef *
KL(logp, ref)`` (verl's k1 / k2 / low_var_kl) minus ``entropy_coef * entropy``; ``mis`` / ``seq-mis`` take tokens /
sequences out of the mask. Every aggregation is linear in the token losses, so it is a per-token weight ``mask *
row_scale[b]`` (``grpo_rows.scales_from_counts``; GSPO's policy term has its own, ``seq-mean-token-mean``). The
kernel (one program per sequence) writes the weighted per-token gradients and per-sequence sums, and backward only
scales the saved gradients by the upstream scalar. What needs a whole sequence first (GSPO's ratio, the kept-token
counts under MIS, seq-MIS's decision) comes from one pass over the rows before it (``grpo_rows.row_info``); plain
GRPO without MIS skips that pass. Gradient conventions match autograd on ``kernels.reference.grpo_loss`` except at
exact ties of the clip branches (measure zero).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import triton_kernel, use_triton
from .grpo_rows import row_info, row_scales, scales_from_counts

BLOCK_T = 1024
_KL_CODE = {"k1": 1, "k2": 2, "low_var_kl": 3}
_LOSS_CODE = {"grpo": 0, "gspo": 1, "cispo": 2}
_RC_CODE = {"none": 0, "tis": 1, "mis": 2, "seq-mis": 3}
STAT_NAMES = ("clip_frac", "clip_frac_dual", "ppo_kl", "kl", "ratio_mean", "rc_weight_mean", "rc_masked_frac")
_SUMS = 8  # per sequence: the loss, then each statistic's numerator


@triton_kernel
def _grpo_kernel(lp_ptr, old_ptr, adv_ptr, adv_stride_b, adv_stride_t, mask_ptr, scale_ptr, ref_ptr, ent_ptr,
                 grad_lp_ptr, grad_ent_ptr, sums_ptr, T, clip_low, clip_high, clip_dual, kl_coef, ent_coef,
                 roll_ptr, rows_ptr, pg_scale_ptr, cap, log_cap,
                 DUAL: tl.constexpr, KL: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr,
                 LOSS: tl.constexpr, RC: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    scale = tl.load(scale_ptr + b)
    if SPLIT:
        pg_scale = tl.load(pg_scale_ptr + b)
    if LOSS == 1:
        log_s = tl.load(rows_ptr + b * 3 + 1)  # the sequence's mean log-ratio over its loss tokens
        seq_ratio = tl.exp(tl.minimum(log_s, 10.0))
    if RC == 3:
        row_keep = tl.load(rows_ptr + b * 3 + 2)
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_clip = tl.zeros((BLOCK,), tl.float32)
    acc_dual = tl.zeros((BLOCK,), tl.float32)
    acc_ppo_kl = tl.zeros((BLOCK,), tl.float32)
    acc_kl = tl.zeros((BLOCK,), tl.float32)
    acc_ratio = tl.zeros((BLOCK,), tl.float32)
    acc_rc = tl.zeros((BLOCK,), tl.float32)
    acc_removed = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, T, BLOCK):
        t = off + tl.arange(0, BLOCK)
        inside = t < T
        m = tl.load(mask_ptr + base + t, mask=inside, other=0.0)
        lp = tl.load(lp_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        if RC != 0:
            d_rc = old - tl.load(roll_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        if RC == 2:  # masked importance sampling: tokens whose ratio is outside [1 / cap, cap] leave the mask
            kept = tl.where((d_rc >= -log_cap) & (d_rc <= log_cap), m, 0.0)
            acc_removed += m - kept
            m = kept
        if RC == 3:  # ... or whole sequences (decided in grpo_rows)
            acc_removed += m * (1.0 - row_keep)
            m = m * row_keep
        on = m != 0
        w = m * scale
        adv = tl.load(adv_ptr + b.to(tl.int64) * adv_stride_b + t * adv_stride_t, mask=inside,
                      other=0.0).to(tl.float32)
        d = lp - old
        log_ratio = tl.minimum(tl.maximum(d, -20.0), 20.0)
        ratio = tl.exp(log_ratio)
        if LOSS == 2:  # CISPO: REINFORCE weighted by the clipped ratio, detached
            clip_r = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
            clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
            dpg = -clip_r * adv
            pg = dpg * lp
        else:
            if LOSS == 1:  # GSPO: the sequence's ratio on every token; d r / d logp = r
                ratio = seq_ratio + tl.zeros_like(lp)
            pg1 = -adv * ratio
            pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
            clipped = pg2 > pg1
            pg = tl.maximum(pg1, pg2)
            if LOSS == 1:
                dpg = tl.where(clipped | ((log_s + tl.zeros_like(lp)) > 10.0), 0.0, pg1)  # clamped: no gradient
            else:
                dpg = tl.where(clipped | (d < -20.0) | (d > 20.0), 0.0, pg1)  # d(-A r)/d logp = -A r
        if DUAL:
            pg3 = -adv * clip_dual
            dual = (pg > pg3) & (adv < 0)
            pg = tl.where(adv < 0, tl.minimum(pg, pg3), pg)
            dpg = tl.where(dual, 0.0, dpg)
            acc_dual += tl.where(on & dual, m, 0.0)
        if RC == 1:  # truncated importance sampling weighs the policy term only
            rc_w = tl.minimum(tl.exp(d_rc), cap)
            pg = pg * rc_w
            dpg = dpg * rc_w
            acc_rc += tl.where(on, m * rc_w, 0.0)
        else:
            acc_rc += tl.where(on, m, 0.0)
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
        if SPLIT:  # GSPO with another agg: the policy term seq-mean-token-mean, KL and entropy by agg
            aux = kl_coef * kl
            if HAS_ENT:
                aux -= ent_coef * tl.load(ent_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
                tl.store(grad_ent_ptr + base + t, -ent_coef * w, mask=inside)
            wp = m * pg_scale
            tl.store(grad_lp_ptr + base + t, tl.where(on, wp * dpg + w * (kl_coef * dkl), 0.0), mask=inside)
            acc_loss += tl.where(on, wp * pg + w * aux, 0.0)
        else:
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
    out = sums_ptr + b * 8
    tl.store(out, tl.sum(acc_loss, 0))
    tl.store(out + 1, tl.sum(acc_clip, 0))
    tl.store(out + 2, tl.sum(acc_dual, 0))
    tl.store(out + 3, tl.sum(acc_ppo_kl, 0))
    tl.store(out + 4, tl.sum(acc_kl, 0))
    tl.store(out + 5, tl.sum(acc_ratio, 0))
    tl.store(out + 6, tl.sum(acc_rc, 0))
    tl.store(out + 7, tl.sum(acc_removed, 0))


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, entropy, old, adv, mask, ref, rollout, clip_low, clip_high, clip_dual, kl_coef,
                kl_type, entropy_coef, agg, loss_type, correction, cap, norm_len):
        B, T = logprobs.shape
        loss_code, rc_code = _LOSS_CODE[loss_type], _RC_CODE[correction]
        log_cap = math.log(cap) if cap > 0 else 0.0
        masking = correction in ("mis", "seq-mis")
        rows = scales = pg_scales = None
        if loss_type == "gspo" or masking:  # a first pass over each sequence
            rows = row_info(logprobs, old, rollout, mask, rc_code, log_cap)
            scales = scales_from_counts(rows[:, 0], agg, norm_len)
            if loss_type == "gspo" and agg != "seq-mean-token-mean":
                pg_scales = scales_from_counts(rows[:, 0], "seq-mean-token-mean", norm_len)
        else:
            scales = row_scales(mask, agg, norm_len)
        grad_lp = torch.empty(B, T, dtype=torch.float32, device=logprobs.device)
        grad_ent = torch.empty_like(grad_lp) if entropy is not None else None
        sums = torch.empty(B, _SUMS, dtype=torch.float32, device=logprobs.device)
        if B:
            _grpo_kernel[(B,)](
                logprobs, old, adv, adv.stride(0), adv.stride(1) if adv.dim() == 2 else 0, mask, scales,
                ref if ref is not None else old, entropy if entropy is not None else old,  # unread placeholders
                grad_lp, grad_ent if grad_ent is not None else grad_lp, sums, T, clip_low, clip_high,
                clip_dual or 0.0, kl_coef, entropy_coef,
                rollout if rollout is not None else old, rows if rows is not None else scales,
                pg_scales if pg_scales is not None else scales, cap, log_cap,
                DUAL=clip_dual is not None, KL=_KL_CODE[kl_type] if ref is not None else 0,
                HAS_ENT=entropy is not None, BLOCK=min(BLOCK_T, triton.next_power_of_2(max(T, 1))),
                LOSS=loss_code, RC=rc_code, SPLIT=pg_scales is not None)
        ctx.save_for_backward(grad_lp, grad_ent)
        ctx.dtypes = (logprobs.dtype, entropy.dtype if entropy is not None else None)
        # the first six columns reduced as one contiguous [B, 6] block: the order of the float sums (and so today's
        # results, bit for bit) does not depend on how many statistics follow
        totals = torch.cat([sums[:, :6].contiguous().sum(0), sums[:, 6:].sum(0)])
        given = mask.sum().clamp(min=1)
        denom = rows[:, 0].sum().clamp(min=1) if masking else given  # the tokens left in the loss
        stats = {name: totals[i + 1] / (given if name == "rc_masked_frac" else denom)
                 for i, name in enumerate(STAT_NAMES)}
        ctx.mark_non_differentiable(*stats.values())
        return (totals[0], *stats.values())

    @staticmethod
    def backward(ctx, g_loss, *_):
        grad_lp, grad_ent = ctx.saved_tensors
        lp_dtype, ent_dtype = ctx.dtypes
        g_ent = (grad_ent * g_loss).to(ent_dtype) if grad_ent is not None else None
        return (grad_lp * g_loss).to(lp_dtype), g_ent, *([None] * 16)


def _check(logprobs, advantages, agg, kl_type, loss_type, rollout_logprobs, rollout_correction, rollout_cap,
           clip_dual, agg_norm_len) -> None:
    if logprobs.dim() != 2 or advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"grpo_loss: logprobs must be [B, T] and advantages [B] or [B, T]; got "
                         f"{tuple(logprobs.shape)} and {tuple(advantages.shape)}")
    for name, value, allowed in (("agg", agg, reference.AGG_MODES), ("kl_type", kl_type, reference.KL_TYPES),
                                 ("loss_type", loss_type, reference.LOSS_TYPES),
                                 ("rollout_correction", rollout_correction, reference.ROLLOUT_CORRECTIONS)):
        if value not in allowed:
            raise ValueError(f"grpo_loss: {name}={value!r}; expected one of {allowed}")
    if clip_dual is not None and loss_type != "grpo":
        raise ValueError(f"grpo_loss: clip_dual={clip_dual} applies to loss_type='grpo' only (got "
                         f"loss_type={loss_type!r}); pass clip_dual=None")
    if rollout_correction != "none":
        if rollout_logprobs is None or rollout_logprobs.shape != logprobs.shape:
            got = None if rollout_logprobs is None else tuple(rollout_logprobs.shape)
            raise ValueError(f"grpo_loss: rollout_correction={rollout_correction!r} needs rollout_logprobs of "
                             f"shape {tuple(logprobs.shape)} (the engine's sampled-token log-probs); got {got}")
        low = 0.0 if rollout_correction == "tis" else 1.0
        if not rollout_cap > low:
            raise ValueError(f"grpo_loss: rollout_cap={rollout_cap} must be > {low:g} for "
                             f"rollout_correction={rollout_correction!r}")
    if agg_norm_len is not None and not agg_norm_len > 0:
        raise ValueError(f"grpo_loss: agg_norm_len={agg_norm_len} must be > 0 (or None: the row length T)")


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
              clip_dual=None, kl_coef=0.0, kl_type="low_var_kl", entropy=None, entropy_coef=0.0,
              agg="token-mean", loss_type="grpo", rollout_logprobs=None, rollout_correction="none",
              rollout_cap=2.0, agg_norm_len=None):
    """GRPO / GSPO / CISPO loss of ``[B, T]`` token log-probs; returns ``(loss, stats)``.

    ``advantages`` ``[B]`` (per sequence) or ``[B, T]``; ``mask`` ``[B, T]`` (bool or 0/1); ``clip_low`` /
    ``clip_high``: asymmetric ratio clip (clip-higher); ``clip_dual``: verl's ``clip_ratio_c`` for ``A < 0``
    (None = off; ``grpo`` only); ``kl_type``: ``k1`` / ``k2`` / ``low_var_kl`` against ``ref_logprobs`` (the KL
    term is skipped when ``ref_logprobs`` is None); ``entropy``: per-token entropy, subtracted with
    ``entropy_coef``; ``agg``: ``token-mean`` / ``seq-mean-token-mean`` / ``seq-mean-token-sum`` /
    ``seq-mean-token-sum-norm`` (the token sum divided by ``agg_norm_len``, default T: Dr. GRPO), as
    ``kernels.reference.agg_loss``.

    ``loss_type``: ``grpo`` (PPO clip), ``gspo`` (verl's ``compute_policy_loss_gspo``: one clipped ratio per
    sequence; its policy term is always ``seq-mean-token-mean``, the KL and entropy terms follow ``agg``) or
    ``cispo`` (``-sg(clip(r)) A logp``). ``rollout_correction`` against ``rollout_logprobs`` (the engine's
    sampled-token log-probs, ``[B, T]``), with ``rho = exp(old - rollout)``: ``none``; ``tis`` multiplies each
    token's policy term (never the KL or entropy terms) by ``min(rho, rollout_cap)``, detached; ``mis`` removes
    tokens with ``rho`` outside ``[1 / rollout_cap, rollout_cap]`` from the mask of every term (sums and counts);
    ``seq-mis`` removes whole sequences on the geometric mean of their ``rho``.

    ``loss`` is a 0-d float32 tensor with gradients to ``logprobs`` and ``entropy``. ``stats``: 0-d float32
    tensors (no host sync; call ``.item()`` when logging), each a mean over the loss tokens: ``clip_frac`` (ratio
    clipped), ``clip_frac_dual`` (dual clip active), ``ppo_kl`` (old - new log-prob), ``kl`` (the KL penalty term,
    0 without a reference), ``ratio_mean`` (GSPO: the sequence ratio), ``rc_weight_mean`` (the TIS weight; 1
    otherwise) and ``rc_masked_frac`` (the fraction of ``mask``'s tokens MIS removed).
    """
    _check(logprobs, advantages, agg, kl_type, loss_type, rollout_logprobs, rollout_correction, rollout_cap,
           clip_dual, agg_norm_len)
    rollout = rollout_logprobs if rollout_correction != "none" else None
    kwargs = dict(ref_logprobs=ref_logprobs, clip_low=clip_low, clip_high=clip_high, clip_dual=clip_dual,
                  kl_coef=kl_coef, kl_type=kl_type, entropy=entropy, entropy_coef=entropy_coef, agg=agg,
                  loss_type=loss_type, rollout_logprobs=rollout, rollout_correction=rollout_correction,
                  rollout_cap=rollout_cap, agg_norm_len=agg_norm_len)
    if not use_triton("grpo_loss", logprobs, old_logprobs, advantages, ref_logprobs, entropy, rollout):
        return reference.grpo_loss(logprobs, old_logprobs, advantages, mask, **kwargs)

    def prep(x):
        return None if x is None else x.contiguous()

    loss, *stats = _GRPOLoss.apply(
        prep(logprobs), prep(entropy), prep(old_logprobs), prep(advantages), mask.to(torch.float32).contiguous(),
        prep(ref_logprobs), prep(rollout), float(clip_low), float(clip_high),
        None if clip_dual is None else float(clip_dual), float(kl_coef), kl_type, float(entropy_coef), agg,
        loss_type, rollout_correction, float(rollout_cap),
        float(logprobs.shape[-1] if agg_norm_len is None else agg_norm_len))
    return loss, dict(zip(STAT_NAMES, stats))
