"""Fused log-prob + entropy of ``logits / temperature`` (Triton), optionally vocab-parallel.

Design. The forward kernel streams each row of a (vocab shard of the) logits once and writes four float32
*partial statistics* per row: running max ``m``, ``s = sum exp(z - m)``, ``sz = sum exp(z - m) * z`` and the
target logit ``t`` (0 when the label lies outside this shard), with ``z = logits / temperature``. Partials of
vocab pieces -- chunks of one rank (``kernels.linear_logprobs``) and shards of a TP group -- merge exactly
(``merge_stats``: max all-reduce, rescaled sum all-reduce), giving ``lse = M + log S``, ``logprob = T - lse``
and ``entropy = lse - SZ / S``. Only per-row ``lse`` and ``entropy`` are saved; the backward kernel recomputes
the softmax and writes

    d/dz = g_lp * onehot(label) - p * (g_lp + g_ent * (z - lse + entropy)),   p = exp(z - lse),

divided by the temperature, straight into the one ``[N, V]`` gradient buffer autograd must return (or, for the
linear variant, over the recomputed logits chunk in place). Rows labelled ``ignore_index`` give logprob 0,
entropy 0 and zero gradient. Labels must otherwise lie in ``[0, V_global)``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import reference
from ._dispatch import triton_kernel, use_triton

BLOCK_V = 4096


@triton_kernel
def _stats_kernel(z_ptr, stride_z, labels_ptr, out_ptr, V, vocab_start, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = z_ptr + row.to(tl.int64) * stride_z
    m = float("-inf")
    s = 0.0
    sz = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inside = cols < V
        z = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new)
        s = s * alpha + tl.sum(p, 0)
        sz = sz * alpha + tl.sum(p * tl.where(inside, z, 0.0), 0)
        m = m_new
    local = tl.load(labels_ptr + row) - vocab_start
    hit = (local >= 0) & (local < V)
    t = tl.load(row_ptr + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32) * inv_temp
    t = tl.where(hit, t, 0.0)
    out = out_ptr + row * 4
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, sz)
    tl.store(out + 3, t)


@triton_kernel
def _grad_kernel(z_ptr, stride_z, grad_ptr, stride_g, labels_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr,
                 V, vocab_start, inv_temp, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    z = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(g_lp_ptr + row)
    p = tl.exp(z - lse)
    coef = g_lp + tl.zeros_like(z)
    if HAS_ENT:
        coef += tl.load(g_ent_ptr + row) * (z - lse + tl.load(ent_ptr + row))
    local = tl.load(labels_ptr + row) - vocab_start
    grad = (tl.where(cols == local, g_lp, 0.0) - p * coef) * inv_temp
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def row_stats(z: torch.Tensor, labels: torch.Tensor, vocab_start: int, temperature: float) -> torch.Tensor:
    """Partial statistics ``[N, 4]`` (m, s, sz, t; float32) of the vocab piece ``z`` [N, V_piece] (unit stride
    along the vocab) whose first column is global id ``vocab_start``."""
    n, v = z.shape
    out = torch.empty(n, 4, dtype=torch.float32, device=z.device)
    if n:
        block = min(BLOCK_V, triton.next_power_of_2(v))
        _stats_kernel[(n,)](z, z.stride(0), labels, out, v, vocab_start, 1.0 / temperature, BLOCK=block,
                            num_warps=_warps(block))
    return out


def merge_stats(parts: list[torch.Tensor], tp_group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge partial statistics of disjoint vocab pieces (this rank's ``parts``, then the ranks of
    ``tp_group``) into ``(lse, target_logit, entropy)`` per row, float32 ``[N]``."""
    stats = torch.stack(parts)  # [K, N, 4]
    m = stats[..., 0].amax(0)
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    scale = torch.exp(stats[..., 0] - m)
    sums = torch.stack([(stats[..., 1] * scale).sum(0), (stats[..., 2] * scale).sum(0), stats[..., 3].sum(0)])
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
    s, sz, t = sums
    lse = m + torch.log(s)
    return lse, t, lse - sz / s


def row_grad(z: torch.Tensor, out: torch.Tensor, labels, lse, entropy, g_lp, g_ent, vocab_start: int,
             temperature: float) -> None:
    """Write d(sum g_lp * logprob + g_ent * entropy)/d logits of the vocab piece ``z`` into ``out`` (may be
    ``z`` itself). ``g_ent`` None means the entropy is unused."""
    n, v = z.shape
    if not n:
        return
    block = min(BLOCK_V, triton.next_power_of_2(v))
    has_ent = g_ent is not None
    _grad_kernel[(n, triton.cdiv(v, block))](
        z, z.stride(0), out, out.stride(0), labels, lse, entropy, g_lp, g_ent if has_ent else g_lp,
        v, vocab_start, 1.0 / temperature, HAS_ENT=has_ent, BLOCK=block, num_warps=_warps(block))


def finish(lse, target, entropy, labels, ignore_index):
    """Per-row outputs ``(logprobs, entropy)``, zeroed on ignored rows."""
    ignored = labels == ignore_index
    return torch.where(ignored, 0.0, target - lse), torch.where(ignored, 0.0, entropy)


def upstream(g_lp, g_ent, labels, ignore_index, like):
    """Float32 upstream gradients with ignored rows zeroed (``g_lp`` materialised, ``g_ent`` may stay None)."""
    keep = labels != ignore_index
    g_lp = torch.zeros_like(like) if g_lp is None else torch.where(keep, g_lp.float(), 0.0).contiguous()
    if g_ent is not None:
        g_ent = torch.where(keep, g_ent.float(), 0.0).contiguous()
    return g_lp, g_ent


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, tp_group, ignore_index):
        start = reference.vocab_range(logits.shape[1], tp_group)[0]
        lse, target, entropy = merge_stats([row_stats(logits, labels, start, temperature)], tp_group)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (start, temperature, ignore_index)
        ctx.set_materialize_grads(False)
        return finish(lse, target, entropy, labels, ignore_index)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, lse, entropy = ctx.saved_tensors
        start, temperature, ignore_index = ctx.args
        g_lp, g_ent = upstream(g_lp, g_ent, labels, ignore_index, lse)
        grad = torch.empty_like(logits)
        row_grad(logits, grad, labels, lse, entropy, g_lp, g_ent, start, temperature)
        return grad, None, None, None, None


def fused_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, tp_group=None,
                   return_entropy: bool = False, ignore_index: int = reference.IGNORE_INDEX):
    """log p(label) of ``logits / temperature`` per row, float32 of ``labels.shape``; with
    ``return_entropy`` the tuple ``(logprobs, entropy)``.

    ``logits`` ``[..., V_local]`` in float32/bfloat16/float16 (accumulated in float32); with ``tp_group`` it
    is this rank's contiguous vocab shard (rank order) and ``labels`` are global ids. Backward returns the
    gradient to ``logits`` (its dtype) without any other ``[N, V]`` buffer; it is local to each rank. Any row
    stride is used in place, but a ``[..., V]`` view that does not flatten to rows (``logits[:, :-1]``) is copied
    once: shift the labels instead of slicing the logits.
    """
    if not use_triton("fused_logprobs", logits):
        return reference.fused_logprobs(logits, labels, temperature, tp_group=tp_group,
                                        return_entropy=return_entropy, ignore_index=ignore_index)
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    flat = flat if flat.stride(1) == 1 else flat.contiguous()
    logprobs, entropy = _FusedLogprobs.apply(flat, labels.reshape(-1).contiguous(), float(temperature),
                                             tp_group, ignore_index)
    logprobs, entropy = logprobs.view(labels.shape), entropy.view(labels.shape)
    return (logprobs, entropy) if return_entropy else logprobs
