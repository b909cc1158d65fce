"""Log-prob (+ entropy) straight from hidden states and the (vocab-sharded) LM-head weight, chunked over vocab.

Design. The vocab shard ``weight`` [V_local, H] is cut into column chunks of ``chunk_size`` ids. Forward, per
chunk: ``z = hidden @ w_chunk.T`` ([N, chunk], in the input dtype, float32 accumulation in the GEMM), then the
Triton statistics kernel of ``kernels.logprobs``; the chunk is dropped and the per-chunk partials merge exactly
(and across ``tp_group``) into per-row ``lse`` / target / entropy. Nothing but ``hidden``, ``weight`` (both by
reference), ``labels`` and two float32 ``[N]`` vectors is saved. Backward recomputes each chunk's logits,
overwrites them in place with their gradient (the Triton gradient kernel), then
``grad_weight[chunk] = g.T @ hidden`` (complete: no cross-chunk accumulation) and
``grad_hidden += g @ w_chunk`` (a float32 ``[N, H]`` accumulator).

Memory bound (beyond inputs and the returned grads): one ``[N, chunk]`` logits buffer, the ``[N, H]`` float32
accumulator and one ``[N, H]`` GEMM temporary; never ``[N, V]``. Cost: one extra forward GEMM (the backward
recompute) over eager's three.

With ``tp_group``, ``hidden`` must be the full activation, replicated across the group (no sequence
parallelism); its gradient is all-reduced here, so do not also wrap it in Megatron's
``copy_to_tensor_model_parallel_region``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import reference
from ._dispatch import use_triton
from .logprobs import finish, merge_stats, row_grad, row_stats, upstream

CHUNK_ELEMENTS = 1 << 26  # target size of the [N, chunk] logits buffer (128 MiB in bf16)


def default_chunk_size(n: int, v_local: int) -> int:
    """Vocab ids per chunk: about ``CHUNK_ELEMENTS / n``, a multiple of 256, at least 256, at most ``v_local``."""
    return max(1, min(v_local, max(256, CHUNK_ELEMENTS // max(n, 1) // 256 * 256)))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, tp_group, chunk, ignore_index):
        v_local = weight.shape[0]
        start = reference.vocab_range(v_local, tp_group)[0]
        parts = [row_stats(hidden @ weight[v0:v0 + chunk].T, labels, start + v0, temperature)
                 for v0 in range(0, v_local, chunk)]
        lse, target, entropy = merge_stats(parts, tp_group)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.args = (start, temperature, tp_group, chunk, ignore_index)
        ctx.set_materialize_grads(False)
        return finish(lse, target, entropy, labels, ignore_index)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        start, temperature, tp_group, chunk, ignore_index = ctx.args
        g_lp, g_ent = upstream(g_lp, g_ent, labels, ignore_index, lse)
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.empty_like(weight) if want_w else None
        for v0 in range(0, weight.shape[0], chunk):
            w = weight[v0:v0 + chunk]
            g = hidden @ w.T
            row_grad(g, g, labels, lse, entropy, g_lp, g_ent, start + v0, temperature)
            if want_h:
                grad_h += g @ w
            if want_w:
                torch.mm(g.T, hidden, out=grad_w[v0:v0 + chunk])
            del g  # before the next chunk is allocated: one chunk buffer at a time
        if want_h and tp_group is not None:
            dist.all_reduce(grad_h, group=tp_group)
        grad_h = grad_h.to(hidden.dtype) if want_h else None
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, *, tp_group=None, return_entropy: bool = False,
                          chunk_size: int | None = None, ignore_index: int = reference.IGNORE_INDEX):
    """``fused_logprobs(hidden @ weight.T, labels, ...)`` without materialising ``[N, V]``.

    ``hidden`` ``[..., H]``, ``weight`` this rank's vocab shard ``[V_local, H]`` (same dtype), ``labels``
    ``[...]`` global ids. ``chunk_size``: vocab ids per chunk (default ``default_chunk_size``). Returns float32
    ``labels.shape`` (and the entropy with ``return_entropy``); backward gives grads to ``hidden`` (summed over
    ``tp_group``) and ``weight``.
    """
    if not use_triton("fused_linear_logprobs", hidden, weight):
        return reference.fused_linear_logprobs(hidden, weight, labels, temperature, tp_group=tp_group,
                                               return_entropy=return_entropy, ignore_index=ignore_index)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or default_chunk_size(flat.shape[0], weight.shape[0])
    logprobs, entropy = _FusedLinearLogprobs.apply(flat, weight, labels.reshape(-1).contiguous(),
                                                   float(temperature), tp_group, int(chunk), ignore_index)
    logprobs, entropy = logprobs.view(labels.shape), entropy.view(labels.shape)
    return (logprobs, entropy) if return_entropy else logprobs
