"""Per-step statistics for ``metrics.jsonl``: rewards, response lengths, log-prob mismatch, time split.

Key names are shared with ``rl.plots`` (``reward/mean``, ``response_length/mean``) and the progress bar.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

import torch

from megatron_tr1.rl.advantages import group_spread


def reward_stats(rewards: Sequence[dict[str, float]], failed: Sequence[bool], n: int) -> dict[str, float]:
    """Mean/std of the overall reward, mean format and accuracy (IoU) parts, how many reward calls failed, and
    the fraction of the ``n``-response groups whose rewards are all equal (no GRPO signal)."""
    overall = torch.tensor([r["overall"] for r in rewards], dtype=torch.float64)
    return {"reward/mean": overall.mean().item(), "reward/std": overall.std(unbiased=False).item(),
            "reward/format": sum(r["format"] for r in rewards) / len(rewards),
            "reward/accuracy": sum(r["accuracy"] for r in rewards) / len(rewards),
            "reward/failed": int(sum(failed)),
            "reward/zero_spread_groups": (group_spread(overall, n) == 0).double().mean().item()}


def task_reward_stats(groups: Sequence[tuple[str, Sequence[dict[str, float]]]]) -> dict[str, float]:
    """Per task (``megatron_tr1.tasks``) of the ``(task, rewards)`` groups: ``reward/<task>/{mean,format,accuracy}``
    and ``reward/<task>/groups`` (how many of the step's groups it had)."""
    by_task: dict[str, list[dict[str, float]]] = {}
    counts: dict[str, int] = {}
    for task, rewards in groups:
        by_task.setdefault(task, []).extend(rewards)
        counts[task] = counts.get(task, 0) + 1
    out = {}
    for task, rewards in by_task.items():
        for key, name in (("overall", "mean"), ("format", "format"), ("accuracy", "accuracy")):
            out[f"reward/{task}/{name}"] = sum(r[key] for r in rewards) / len(rewards) if rewards else 0.0
        out[f"reward/{task}/groups"] = counts[task]
    return out


def length_stats(lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float]:
    """Response length mean/min/max in tokens and the fraction cut at ``rollout.max_tokens``."""
    t = torch.tensor(lengths, dtype=torch.float64)
    return {"response_length/mean": t.mean().item(), "response_length/min": t.min().item(),
            "response_length/max": t.max().item(), "response_length/clip_frac": sum(truncated) / len(truncated)}


def logprob_mismatch(engine: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max ``|engine - trainer|`` over masked tokens: the engine's sampled-token log-probs against the
    trainer's old-policy ones. Large values mean stale weights after sync or a kernel bug."""
    diff = (engine.double() - trainer.double()).abs()[mask.bool()]
    if diff.numel() == 0:
        return {"logprob_mismatch/mean": 0.0, "logprob_mismatch/max": 0.0}
    return {"logprob_mismatch/mean": diff.mean().item(), "logprob_mismatch/max": diff.max().item()}


class StepTimer:
    """Wall time per phase of a step: ``with timer("rollout"): ...`` adds to ``time/rollout`` (seconds).
    Pass ``sync`` (e.g. ``torch.cuda.synchronize``) so GPU work is timed, not just queued."""

    def __init__(self, sync=None):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def stats(self, tokens: int | None = None) -> dict[str, float]:
        """``time/<phase>``, ``time/step`` (their sum) and, given the step's token count, ``tokens_per_s``."""
        total = sum(self.seconds.values())
        out = {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": total}
        if tokens is not None and total > 0:
            out["tokens_per_s"] = tokens / total
        return out
