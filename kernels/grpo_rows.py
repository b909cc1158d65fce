"""What the GRPO loss kernel needs to know about each whole sequence before its token pass, and the aggregations'
per-sequence weights.

``row_info`` (Triton, one program per sequence) gives per sequence: the tokens left in the loss after masked
importance sampling (``mis``: per token, ``seq-mis``: the whole sequence on the geometric mean of its token ratios),
the mean log-ratio ``logp - old`` over those tokens (GSPO's sequence ratio is its exp) and the ``seq-mis`` decision.
``scales_from_counts`` turns kept-token counts into the weight ``row_scale[b]`` of each token of sequence ``b``, so
that every aggregation is ``sum(x * mask * row_scale[:, None])``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import triton_kernel

BLOCK_T = 1024
ROW_FIELDS = 3  # kept tokens, mean log-ratio over them, seq-mis keep flag (1 / 0)


@triton_kernel
def _rows_kernel(lp_ptr, old_ptr, roll_ptr, mask_ptr, rows_ptr, T, log_cap, RC: tl.constexpr,
                 BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * T
    acc_n = tl.zeros((BLOCK,), tl.float32)
    acc_kept = tl.zeros((BLOCK,), tl.float32)
    acc_lr = tl.zeros((BLOCK,), tl.float32)
    acc_rc = tl.zeros((BLOCK,), tl.float32)
    for off in range(0, T, BLOCK):
        t = off + tl.arange(0, BLOCK)
        inside = t < T
        m = tl.load(mask_ptr + base + t, mask=inside, other=0.0)
        lp = tl.load(lp_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        keep = m
        if RC >= 2:
            d_rc = old - tl.load(roll_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
            if RC == 2:
                keep = tl.where((d_rc >= -log_cap) & (d_rc <= log_cap), m, 0.0)
            else:
                acc_rc += tl.where(m != 0, m * d_rc, 0.0)
        acc_n += m
        acc_kept += keep
        acc_lr += tl.where(keep != 0, keep * (lp - old), 0.0)
    n = tl.sum(acc_n, 0)
    kept = tl.sum(acc_kept, 0)
    log_ratio = tl.sum(acc_lr, 0)
    row_keep = n * 0.0 + 1.0
    if RC == 3:
        mean_rc = tl.sum(acc_rc, 0) / tl.maximum(n, 1.0)
        row_keep = tl.where((mean_rc >= -log_cap) & (mean_rc <= log_cap), 1.0, 0.0)
        kept = kept * row_keep
        log_ratio = log_ratio * row_keep
    out = rows_ptr + b * 3
    tl.store(out, kept)
    tl.store(out + 1, log_ratio / tl.maximum(kept, 1.0))
    tl.store(out + 2, row_keep)


def row_info(logprobs, old_logprobs, rollout_logprobs, mask, rc_code: int, log_cap: float) -> torch.Tensor:
    """``[B, 3]`` float32: kept tokens, mean ``logp - old`` over them, seq-MIS keep flag (``rc_code``: 0 none,
    1 tis, 2 mis, 3 seq-mis; ``mask`` float32 contiguous)."""
    B, T = logprobs.shape
    rows = torch.empty(B, ROW_FIELDS, dtype=torch.float32, device=logprobs.device)
    if B:
        _rows_kernel[(B,)](logprobs, old_logprobs, rollout_logprobs if rollout_logprobs is not None else old_logprobs,
                           mask, rows, T, log_cap, RC=rc_code,
                           BLOCK=min(BLOCK_T, triton.next_power_of_2(max(T, 1))))
    return rows


def scales_from_counts(counts: torch.Tensor, agg: str, norm_len: float) -> torch.Tensor:
    """Per-sequence weight ``[B]`` from each sequence's loss-token count ``[B]`` for ``agg``
    (``norm_len``: the constant of ``seq-mean-token-sum-norm``)."""
    if agg == "token-mean":
        return (1.0 / counts.sum().clamp(min=1)).expand_as(counts).contiguous()
    if agg == "seq-mean-token-sum":
        return torch.full_like(counts, 1.0 / counts.numel())
    if agg == "seq-mean-token-sum-norm":
        return torch.full_like(counts, 1.0 / (counts.numel() * norm_len))
    if agg == "seq-mean-token-mean":
        return 1.0 / (counts.clamp(min=1) * (counts > 0).sum().clamp(min=1))
    raise ValueError(f"agg={agg!r}: expected one of {reference.AGG_MODES}")


def row_scales(mask: torch.Tensor, agg: str, norm_len: float | None = None) -> torch.Tensor:
    """Per-sequence weight ``[B]`` such that ``agg_loss(x, mask, agg) == sum(x * mask * row_scales[:, None])``."""
    return scales_from_counts(mask.sum(-1), agg, mask.shape[-1] if norm_len is None else norm_len)
