"""One optimizer update over micro-batches, shared by the GRPO and SFT steps.

Micro-batches run through megatron-core's forward-backward schedule (``forward_backward``), each loss weighted
by its share of the update's tokens summed over data parallel (``loss_weights``), then gradients are reduced and
clipped and the optimizer steps (``optimizer_step``) - with a megatron-core optimizer
(``distributed.wrap_ddp_and_optimizer``) or a plain torch one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tr1.rl.batching import TokenSequence, split_by_count, split_by_tokens
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.prompts import model_batch, policy_logprobs


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``Qwen2_5_VLModel`` inside a megatron DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def forward_backward(model, batches: list[dict], loss_fn: Callable, temperature: float = 1.0,
                     forward_only: bool = False, entropy: bool = False) -> list[dict]:
    """``loss_fn(batch, output) -> (loss, stats dict)`` over micro-batches through megatron-core's schedule;
    ``output`` is ``forward_logprobs``'s (a ``(logprobs, entropy)`` pair when ``entropy``). The schedule divides
    each loss by the number of micro-batches, so ``loss_fn`` returns losses already summing to the total.
    Returns the stats dicts on the last pipeline stage, ``[]`` on the others. The RL forward is called on the unwrapped model (DDP's
    grad hooks still fire; its forward pre-hooks, used only with ``overlap_param_gather``, do not)."""
    device = next(unwrap(model).parameters()).device

    def forward_step(data_iterator, wrapped):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(data_iterator).items()}
        out = policy_logprobs(unwrap(wrapped), batch, temperature, return_entropy=entropy)

        def loss_func(output):
            loss, stats = loss_fn(batch, output)
            return loss * len(batches), stats
        return out, loss_func

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # micro-batches differ in width: send shapes first. Set here, not in TransformerConfig(...): its
        # construction-time check refuses variable_seq_lengths with the default (MoE) token dispatcher
        unwrap(model).config.variable_seq_lengths = True
    with torch.set_grad_enabled(not forward_only):
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
            seq_length=max(b["input_ids"].shape[1] for b in batches),
            micro_batch_size=max(b["input_ids"].shape[0] for b in batches), forward_only=forward_only)


def loss_weights(units: list[float]) -> list[float]:
    """Each micro-batch's share of the update's ``units`` (tokens or rows) summed over the data-parallel group,
    times the DP size (megatron DDP averages gradients over DP): the gradient is that of the global mean.
    DP>1 therefore needs the DDP wrapper (``distributed.wrap_ddp_and_optimizer``)."""
    total = torch.tensor(float(sum(units)), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    dp = parallel_state.get_data_parallel_world_size() if dist.is_initialized() else 1
    return [dp * float(u) / max(total.item(), 1.0) for u in units]


def optimizer_step(model, optimizer, grad_clip: float) -> float:
    """Clip the gradients and step; returns the gradient norm before clipping. With a megatron-core optimizer
    (``distributed.wrap_ddp_and_optimizer``: ``model`` is DDP-wrapped) the gradients are first reduced over DP
    (``finalize_model_grads``); it clips with its own ``clip_grad``. A torch optimizer is clipped here."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import MegatronOptimizer

    if isinstance(optimizer, MegatronOptimizer):
        finalize_model_grads([model])
        if not grads_finite(model):
            return float("nan")
        return float(optimizer.step()[1])
    params = [p for p in model.parameters() if p.requires_grad]
    if not grads_finite(model):
        return float("nan")
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return float(norm)


def grads_finite(model) -> bool:
    """Whether every gradient on every rank is finite (a non-finite one: the step is skipped, its gradient norm
    reported as NaN, and ``rl.guards.NanGuard`` counts it)."""
    finite = torch.ones((), dtype=torch.float32)
    for p in model.parameters():
        grad = getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
        if p.requires_grad and grad is not None and not torch.isfinite(grad).all():
            finite.zero_()
            break
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def zero_grad(model, optimizer) -> None:
    optimizer.zero_grad()
    if hasattr(model, "zero_grad_buffer"):  # megatron DDP keeps gradients in its own buffers
        model.zero_grad_buffer()


def micro_batches(seqs: list[TokenSequence], prompts: list, index: list[int], cfg: TrainConfig, hf_config,
                  pad_id: int) -> list[tuple[list[int], dict]]:
    """``(sequence indices, model_batch)`` micro-batches of the sequences ``index``: ``optim.micro_batch_size``
    sequences each, or grouped by ``optim.max_tokens_per_micro_batch`` tokens when that is set (first-fit
    decreasing: few micro-batches of similar size); each packed into one row (``optim.packing``, when padding would
    waste at least ``optim.packing_min_saving`` of its slots) or padded to its longest sequence."""
    o = cfg.optim
    if o.max_tokens_per_micro_batch:
        parts = split_by_tokens([len(seqs[i]) for i in index], o.max_tokens_per_micro_batch, o.micro_batch_size)
    else:
        parts = split_by_count(len(index), o.micro_batch_size)
    out = []
    for part in parts:
        rows = [index[k] for k in part]
        packed = o.packing and padding_share([len(seqs[i]) for i in rows]) >= o.packing_min_saving
        out.append((rows, model_batch([seqs[i] for i in rows], [prompts[i] for i in rows], hf_config, pad_id,
                                      packed=packed)))
    return out


def padding_share(lengths: list[int]) -> float:
    """The share of a padded micro-batch's token slots that would be padding: 1 - tokens / (sequences x longest)."""
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths)) if lengths else 0.0


def batch_stats(mbs: list[tuple[list[int], dict]]) -> dict[str, float]:
    """``batch/tokens`` (real tokens), ``batch/micro_batches`` and ``batch/pad_fraction`` (padded token slots / all
    slots the model computed; 0 when packed)."""
    tokens = sum(int(b["lengths"].sum()) for _, b in mbs)
    slots = sum(b["input_ids"].numel() for _, b in mbs)
    return {"batch/tokens": tokens, "batch/micro_batches": len(mbs),
            "batch/pad_fraction": 1.0 - tokens / slots if slots else 0.0}
