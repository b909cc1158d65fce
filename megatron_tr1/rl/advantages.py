"""GRPO advantages and the filters applied to a rollout batch before them.

Order in a step: rewards -> ``kl_penalized_rewards`` (only with ``algorithm.kl_in_reward``) -> dynamic sampling
on the task reward (``DynamicSampler``) -> ``group_advantages`` -> ``overlong_keep`` zeroes the loss mask of
truncated responses. Responses are laid out group-major: the ``n`` responses of prompt ``g`` are rows
``g * n .. g * n + n - 1``.
"""
from __future__ import annotations

import dataclasses
from typing import Generic, Sequence, TypeVar

import torch

from megatron_tr1.errors import ConfigError

T = TypeVar("T")


def _groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        raise ConfigError(f"rollout.n={n}: group-normalised advantages need n >= 2")
    if rewards.dim() != 1 or rewards.numel() % n:
        raise ValueError(f"rewards must be 1-D with a multiple of n={n} entries, got shape {list(rewards.shape)}")
    return rewards.view(-1, n)


def group_spread(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """``max - min`` of each group's rewards, ``[num_groups]``; 0 means every response scored the same."""
    g = _groups(rewards, n)
    return g.max(dim=1).values - g.min(dim=1).values


def group_advantages(rewards: torch.Tensor, n: int, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantages ``(r - group mean) / (group std + eps)`` (``norm_by_std=False``: ``r - mean``).

    ``rewards``: ``[num_groups * n]``, group-major. The std is the unbiased one (Bessel), as verl's GRPO. A group
    whose rewards are all equal gets exactly 0 (not rounding noise divided by ``eps``). Computed in float64,
    returned in float32.
    """
    g = _groups(rewards, n).double()
    centred = g - g.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    flat = (g.max(dim=1, keepdim=True).values == g.min(dim=1, keepdim=True).values)
    return centred.masked_fill(flat, 0.0).float().reshape(-1)


def kl_penalized_rewards(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``reward - beta * sum_t KL_t`` over each response's masked tokens (``kl``, ``mask``: ``[B, T]``)."""
    if kl.shape != mask.shape or kl.shape[0] != rewards.shape[0]:
        raise ValueError(f"kl {list(kl.shape)}, mask {list(mask.shape)} and rewards {list(rewards.shape)} disagree")
    return rewards - beta * (kl * mask.to(kl.dtype)).sum(dim=-1).to(rewards.dtype)


def overlong_keep(token_ids: Sequence[Sequence[int]], stop_token_id: int, max_tokens: int) -> torch.Tensor:
    """Bool ``[B]``: False for responses truncated at ``max_tokens`` (not ending with the stop token).

    Multiply a response's loss mask by this to drop it from the loss (overlong filtering) while it still counts
    in its group's advantage statistics.
    """
    return torch.tensor([not (len(ids) >= max_tokens and ids[-1] != stop_token_id) for ids in token_ids],
                        dtype=torch.bool)


@dataclasses.dataclass
class DynamicSampler(Generic[T]):
    """Collects prompt groups with a reward spread over several rollout batches (DAPO's dynamic sampling).

    Call ``add(groups, rewards)`` with each new rollout batch until ``done``; ``take()`` returns exactly
    ``target`` groups: the kept ones in arrival order, topped up with dropped (zero-spread, zero-advantage)
    groups when ``max_tries`` batches did not yield enough, so batch shapes stay fixed. ``stats()`` counts them.
    """

    target: int
    max_tries: int
    kept: list[T] = dataclasses.field(default_factory=list)
    dropped: list[T] = dataclasses.field(default_factory=list)
    tries: int = 0

    def __post_init__(self):
        if self.target < 1 or self.max_tries < 1:
            raise ConfigError(f"dynamic sampling needs target >= 1 and algorithm.max_sampling_tries >= 1, got "
                              f"target={self.target}, max_tries={self.max_tries}")

    @property
    def done(self) -> bool:
        return len(self.kept) >= self.target or self.tries >= self.max_tries

    def add(self, groups: Sequence[T], rewards: torch.Tensor) -> bool:
        """Sort one batch's groups (``rewards``: ``[len(groups) * n]``, group-major) into kept and dropped;
        returns ``done``."""
        if self.done:
            raise RuntimeError("DynamicSampler.add after done; call take()")
        if not groups or rewards.numel() % len(groups):
            raise ValueError(f"{rewards.numel()} rewards for {len(groups)} groups")
        spread = group_spread(rewards, rewards.numel() // len(groups))
        for group, s in zip(groups, spread.tolist()):
            (self.kept if s > 0 else self.dropped).append(group)
        self.tries += 1
        return self.done

    def take(self) -> list[T]:
        """The ``target`` groups for this step (see the class docstring)."""
        if not self.done:
            raise RuntimeError(f"DynamicSampler.take before done ({len(self.kept)}/{self.target} groups kept)")
        out = self.kept[: self.target]
        return out + self.dropped[: self.target - len(out)]

    def stats(self) -> dict[str, float]:
        """``tries`` (rollout batches), ``dropped`` (zero-spread groups seen), ``filled`` (of those, used to top
        up the step), ``surplus`` (kept groups beyond ``target``, discarded)."""
        filled = max(0, min(self.target - len(self.kept), len(self.dropped)))
        return {"dynamic_sampling/tries": self.tries, "dynamic_sampling/dropped": len(self.dropped),
                "dynamic_sampling/filled": filled,
                "dynamic_sampling/surplus": max(0, len(self.kept) - self.target)}
