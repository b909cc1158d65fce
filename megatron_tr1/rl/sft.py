"""One SFT step: cross-entropy on the answer tokens only, through the same micro-batches and schedule as GRPO.

Each grounding prompt gets the target ``rl.batching.sft_target`` (think template + answer JSON, or the answer
alone) followed by ``<|im_end|>``; ``sft_sequence`` puts the loss mask on exactly those tokens. The loss is
``-mean log p`` over every masked token of the batch (token-mean, exact across micro-batches), computed with
``forward_logprobs`` (no logits materialised).
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_tr1.rl.batching import TokenSequence, sft_sequence, sft_target
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.update import batch_stats, forward_backward, loss_weights, micro_batches, optimizer_step, zero_grad
from megatron_tr1.rl.prompts import GroundingPrompt
from megatron_tr1.rl.stats import StepTimer
from megatron_tr1.rollout.engine import stop_token_id


def sft_sequences(items: Sequence[GroundingPrompt], tokenizer, think: bool = True) -> list[TokenSequence]:
    """Prompt + ground-truth target + ``<|im_end|>`` for each item (the loss covers the last two)."""
    stop = stop_token_id(tokenizer)
    return [sft_sequence(tokenizer, i.prompt.input_ids, sft_target(*i.gt, think=think), stop)
            for i in items]


def sft_loss_fn(batch: dict, logprobs: torch.Tensor):
    """``-mean log p`` over the micro-batch's masked tokens times its ``weight`` (its share of the batch's)."""
    tokens = batch["loss_mask"].sum()
    nll = -(logprobs * batch["loss_mask"]).sum()
    return nll / tokens.clamp(min=1) * batch["weight"], {"nll": nll.detach(), "tokens": tokens}


def sft_step(policy, optimizer, items: Sequence[GroundingPrompt], cfg: TrainConfig, tokenizer, hf_config,
             think: bool | None = None, sync=None) -> dict[str, float]:
    """One optimizer step of SFT on ``items`` (this rank's batch, prompts built with frames); returns
    ``loss`` (mean negative log-likelihood per answer token), ``grad_norm``, ``tokens`` and the time split
    (``sync``: the backend's, so the timer waits for the device)."""
    timer = StepTimer(sync)
    seqs = sft_sequences(items, tokenizer, cfg.algorithm.think if think is None else think)
    with timer("update"):
        mbs = micro_batches(seqs, [i.prompt for i in items], list(range(len(seqs))), cfg, hf_config,
                            tokenizer.pad_token_id or 0)
        for (_, batch), weight in zip(mbs, loss_weights([float(b["loss_mask"].sum()) for _, b in mbs])):
            batch["weight"] = weight
        zero_grad(policy, optimizer)
        stats = forward_backward(policy, [b for _, b in mbs], sft_loss_fn)
        grad_norm = optimizer_step(policy, optimizer, cfg.optim.grad_clip)
    tokens = float(sum(s["tokens"] for s in stats))
    return {"loss": float(sum(s["nll"] for s in stats)) / max(tokens, 1.0), "grad_norm": grad_norm,
            "tokens": tokens} | batch_stats(mbs) | \
        timer.stats(tokens=sum(len(s) for s in seqs))
