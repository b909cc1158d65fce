"""One rollout engine per model-parallel group, seen by every rank of the group.

With TP (x PP) > 1 the policy's ranks must train on the same responses, but only the group's first rank holds
an engine (``weight_sync`` gathers the full weights into it). ``GroupEngine`` wraps that engine on every rank of
the group: ``generate`` runs on the holder and its responses are broadcast to the others
(``broadcast_object_list``: token ids, text and log-probs are small); ``update_weights``, ``sleep`` and
``wake_up`` act on the holder only. At TP = PP = 1 the group has one rank and nothing is sent.
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_tr1.data.prompt import RolloutPrompt
from megatron_tr1.rollout.engine import Response, RolloutEngine, Sampling


class GroupEngine(RolloutEngine):
    """``engine`` (on the holder, ``None`` elsewhere) shared over ``group``, whose first rank is the holder."""

    def __init__(self, engine: RolloutEngine | None, group, dtype: torch.dtype):
        self.engine, self.group, self.dtype = engine, group, dtype
        self.ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.src = self.ranks[0]
        if (engine is not None) != (not dist.is_initialized() or dist.get_rank() == self.src):
            raise ValueError("GroupEngine: exactly the group's first rank must hold the engine")

    @property
    def holder(self) -> bool:
        return self.engine is not None

    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling) -> list[list[Response]]:
        out = [self.engine.generate(prompts, n, sampling) if self.holder else None]
        if len(self.ranks) > 1:
            dist.broadcast_object_list(out, src=self.src, group=self.group)
        return out[0]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self.holder:
            return self.engine.update_weights(named_tensors)
        return len(collections.deque(named_tensors))  # run the stream's collectives

    def sleep(self) -> None:
        if self.holder:
            self.engine.sleep()

    def wake_up(self) -> None:
        if self.holder:
            self.engine.wake_up()
