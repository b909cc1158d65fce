"""Who generates what: every rank of the job is a rollout worker.

The world's ``W`` ranks form ``R = W / t`` rollout replicas of ``t = rollout.tensor_parallel`` consecutive ranks
(vLLM's own grouping under ``external_launcher``: replica ``r`` is ranks ``r*t .. r*t + t - 1``, its engine's
data-parallel rank ``r``). Generation is collective over the world: every rank calls ``generate`` the same number
of times (vLLM keeps its replicas in lockstep), each replica on its own slice of the prompts, and the responses
reach every rank (``all_gather_object`` from the replicas' first ranks: token ids, text and log-probs are small).

- Training (``RolloutPlacement.generate``): each training data-parallel replica passes its own prompts (its
  tensor/pipeline peers the same ones). The step's prompts are all of them in data-parallel order, cut into ``R``
  contiguous slices; a replica builds the prompts of its slice it does not hold from their ``key`` (the video and
  query: ``prompt_of``), and each rank gets back its own prompts' responses. Where rollout replicas line up with
  training replicas (``t`` = TP and PP = 1, the usual case) every replica generates exactly its own prompts.
- Evaluation (``RolloutPlacement.generate_shared``): every rank passes the same prompts (built lazily by the caller
  from the slice it is given), cut into ``R`` slices; every rank gets all the answers.

Sampling seeds follow the prompt's index in the whole step (``seeds``), so a prompt samples the same tokens
whichever replica generates it, and a run with R replicas samples what one replica would over the same prompts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch.distributed as dist

from megatron_tr1.data.prompt import RolloutPrompt
from megatron_tr1.errors import ConfigError
from megatron_tr1.rollout.engine import Response, RolloutEngine, Sampling


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
    """``world`` ranks in replicas of ``tp`` consecutive ranks; this ``rank``'s replica and whether it leads it."""

    world: int
    rank: int
    tp: int

    def __post_init__(self):
        if self.tp < 1 or self.world % self.tp:
            raise ConfigError(f"rollout.tensor_parallel={self.tp} must divide the world size {self.world} (every "
                              f"rank runs one rollout worker: world / rollout.tensor_parallel replicas)")

    @classmethod
    def current(cls, tp: int) -> "ReplicaLayout":
        if not dist.is_initialized():
            return cls(1, 0, tp)
        return cls(dist.get_world_size(), dist.get_rank(), tp)

    @property
    def replicas(self) -> int:
        return self.world // self.tp

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def leader(self) -> bool:
        return self.rank % self.tp == 0


def split(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into ``parts`` contiguous, balanced slices (the first ``count % parts`` one longer)."""
    size, extra = divmod(count, parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        out.append(range(start, end))
        start = end
    return out


def _all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class RolloutPlacement:
    """This rank's ``engine`` (one rollout worker of its replica) placed among the world's replicas.

    ``prompt_of(key)`` builds a prompt another training replica holds (see the module docstring); ``dp_rank`` and
    ``dp_size`` place this rank's prompts in the step (training data parallelism). ``dtype`` is the engine's."""

    def __init__(self, engine: RolloutEngine, layout: ReplicaLayout, prompt_of: Callable[[tuple], RolloutPrompt],
                 dp_rank: int = 0, dp_size: int = 1):
        self.engine, self.layout, self.prompt_of = engine, layout, prompt_of
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.dtype = getattr(engine, "dtype", None)
        self.generated = 0  # prompts this replica generated in the last call
        self.step_stats: dict = {}  # replicas that generated and tokens generated, summed until read (grpo_step)

    # --- the engine interface the trainer uses on every rank ---
    @property
    def tensor_parallel(self) -> int:
        return getattr(self.engine, "tensor_parallel", 1)

    @property
    def vision_data_parallel(self) -> bool:
        return getattr(self.engine, "vision_data_parallel", False)

    def vocab_range(self) -> tuple[int, int]:
        return self.engine.vocab_range()

    def update_weights(self, named_tensors) -> int:
        return self.engine.update_weights(named_tensors)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def _slice_responses(self, prompts: Sequence[RolloutPrompt], seeds: Sequence[int], n: int,
                         sampling: Sampling) -> list[list[Response]]:
        """This replica's generation; called by every rank even with no prompt (vLLM's replicas step together)."""
        self.generated = len(prompts)
        return self.engine.generate(list(prompts), n, sampling, seeds=list(seeds))

    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling) -> list[list[Response]]:
        """``n`` responses for each of this training replica's ``prompts`` (collective over the world; see the
        module docstring). ``sampling.seed`` is the step's base seed: the prompt at index ``g`` of the whole step
        samples with ``seed + g``."""
        lay = self.layout
        per_rank = _all_gather((self.dp_rank, [p.key for p in prompts]), lay.world)
        by_dp: dict[int, list] = {}
        for dp_rank, keys in per_rank:
            by_dp.setdefault(dp_rank, keys)  # a replica's tensor / pipeline peers pass the same prompts
        owner = [(d, i) for d in sorted(by_dp) for i in range(len(by_dp[d]))]  # step order: by data-parallel rank
        keys = [by_dp[d][i] for d, i in owner]
        start = sum(len(by_dp[d]) for d in sorted(by_dp) if d < self.dp_rank)
        local = {start + i: p for i, p in enumerate(prompts)}
        part = split(len(owner), lay.replicas)[lay.replica]
        todo = [local[g] if g in local else self._rebuild(keys[g]) for g in part]
        base = 0 if sampling.seed is None else sampling.seed
        out = self._slice_responses(todo, [base + g for g in part], n, sampling)
        gathered = _all_gather((lay.replica, out) if lay.leader else None, lay.world)
        responses: list = [None] * len(owner)
        for item in gathered:
            if item is not None:
                replica, outs = item
                for g, r in zip(split(len(owner), lay.replicas)[replica], outs):
                    responses[g] = r
        self._count(gathered)
        return responses[start: start + len(prompts)]

    def _count(self, gathered: list) -> None:
        worked = {item[0] for item in gathered if item is not None and item[1]}
        tokens = sum(len(x.token_ids) for item in gathered if item is not None for group in item[1] for x in group)
        self.step_stats = {"replicas": max(len(worked), self.step_stats.get("replicas", 0)),
                           "tokens": self.step_stats.get("tokens", 0) + tokens}

    def _rebuild(self, key):
        if key is None:
            raise ValueError("a prompt generated by another rollout replica needs its key (data.prompt_cache sets "
                             "it); build prompts through PromptCache")
        return self.prompt_of(key)

    def generate_shared(self, count: int, build: Callable[[list[int]], list[RolloutPrompt | None]], n: int,
                        sampling: Sampling, batch_size: int = 32) -> list[list[Response] | None]:
        """Evaluation: ``count`` prompts every rank agrees on, cut into one slice per replica; each replica builds
        (``build(indices)``; None for a prompt to skip) and generates its slice ``batch_size`` prompts at a time (so
        only a batch's videos need be in memory), every replica the same number of times; every rank gets all the
        responses (None where skipped)."""
        lay = self.layout
        parts = split(count, lay.replicas)
        part = list(parts[lay.replica])
        batches = -(-max(len(p) for p in parts) // batch_size) if count else 0
        mine: list = []
        for b in range(batches):
            indices = part[b * batch_size: (b + 1) * batch_size]
            todo = [(g, p) for g, p in zip(indices, build(indices) if indices else []) if p is not None]
            base = 0 if sampling.seed is None else sampling.seed
            out = self._slice_responses([p for _, p in todo], [base + g for g, _ in todo], n, sampling)
            mine += [(g, r) for (g, _), r in zip(todo, out)]
        responses: list = [None] * count
        for item in _all_gather(mine if lay.leader else None, lay.world):
            for g, r in item or ():
                responses[g] = r
        return responses
