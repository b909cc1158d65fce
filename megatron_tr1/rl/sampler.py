"""The order in which training prompts are drawn, and its position (what a checkpoint stores to resume).

Epoch ``e`` visits every prompt once in a permutation seeded by ``(seed, e)`` (the identity without shuffle),
so the order depends only on the seed and the position ``(epoch, index)``: a run resumed at a position draws
the same prompts as one that never stopped.
"""
from __future__ import annotations

import torch

from megatron_tr1.errors import ConfigError


class PromptSampler:
    """Draws prompt indices in ``range(num)``, epoch after epoch; ``position`` is ``(epoch, index in epoch)``."""

    def __init__(self, num: int, seed: int = 0, shuffle: bool = True, epoch: int = 0, index: int = 0):
        if num < 1:
            raise ConfigError("the training data has no samples; check data.train")
        if not 0 <= index < num or epoch < 0:
            raise ConfigError(f"data position (epoch {epoch}, index {index}) is outside {num} samples; "
                              f"was the checkpoint made with other training data?")
        self.num, self.seed, self.shuffle = num, seed, shuffle
        self.epoch, self.index = epoch, index
        self._order = self.order(epoch)

    def order(self, epoch: int) -> list[int]:
        """The permutation of ``range(num)`` that epoch ``epoch`` visits."""
        if not self.shuffle:
            return list(range(self.num))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        """The next ``k`` indices, continuing into the next epoch when this one runs out."""
        out = []
        while len(out) < k:
            step = min(k - len(out), self.num - self.index)
            out += self._order[self.index: self.index + step]
            self.index += step
            if self.index == self.num:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self.order(self.epoch)
        return out

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index


def shard(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous slice of ``items`` among ``world`` data-parallel ranks (equal sizes)."""
    if len(items) % world:
        raise ConfigError(f"{len(items)} prompts per step cannot be split evenly over {world} data-parallel ranks; "
                          f"make rollout.prompts_per_step a multiple of {world}")
    size = len(items) // world
    return items[rank * size: (rank + 1) * size]
