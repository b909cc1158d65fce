"""Training data-parallel ranks balanced by tokens (``optim.balance_tokens``).

Each training replica generates and scores its own prompts' groups; their responses differ in length, so one
replica may get far more tokens than another and the whole step waits for it. Before the micro-batches are made,
the replicas agree (one ``all_gather_object`` of token counts over the data-parallel group) on which whole groups
change hands, and the moved groups travel with their prompt, responses and rewards (a second
``all_gather_object``, of the moved groups only). Whole groups move because advantages are normalised within a
group; every replica keeps its number of groups, so the number of sequences per update is unchanged; the loss is
normalised over the whole update (``rl.update.loss_weights``), so the gradient is the same sum wherever a sequence
is trained (tested: the same weights as without balancing). Tensor and pipeline peers hold the same groups and
reach the same decision.

The plan (``swap_plan``) starts from where the groups are and repeats the one swap between the most and the least
loaded replica that narrows their gap most, until no swap does: few groups move, none when the loads are even.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

MAX_SWAPS_PER_GROUP = 4  # a bound on the search; a swap always narrows the widest gap, so it ends far sooner


def swap_plan(loads: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Where each replica's groups go: ``loads[r][i]`` is the tokens of replica ``r``'s group ``i``; returns, per
    replica, the ``(replica, index)`` of the groups it trains after balancing (sorted; counts unchanged)."""
    held = [[(r, i) for i in range(len(row))] for r, row in enumerate(loads)]
    tokens = {(r, i): n for r, row in enumerate(loads) for i, n in enumerate(row)}
    for _ in range(MAX_SWAPS_PER_GROUP * max(len(tokens), 1)):
        sums = [sum(tokens[g] for g in h) for h in held]
        hi = max(range(len(held)), key=lambda r: (sums[r], -r))
        lo = min(range(len(held)), key=lambda r: (sums[r], r))
        gap = sums[hi] - sums[lo]
        best = None  # (the gap after the swap, a, b)
        for a in held[hi]:
            for b in held[lo]:
                delta = tokens[a] - tokens[b]
                after = abs(gap - 2 * delta)
                if 0 < delta < gap and after < gap and (best is None or (after, a, b) < best):
                    best = (after, a, b)
        if best is None:
            break
        _, a, b = best
        held[hi].remove(a)
        held[lo].remove(b)
        held[hi].append(b)
        held[lo].append(a)
    return [sorted(h) for h in held]


def group_tokens(group) -> int:
    """Tokens the trainer computes for one group: the prompt once per response plus each response."""
    prompt = len(group.item.prompt.input_ids)
    return sum(prompt + len(x.token_ids) for x in group.responses)


def balance_groups(groups: list, dp_rank: int, dp_size: int, group=None) -> tuple[list, dict[str, float]]:
    """This replica's groups after balancing over the data-parallel ``group`` (a collective on it), and the stats
    ``batch/dp_moved_groups`` and ``batch/dp_imbalance`` before and after (the most loaded replica's tokens over
    the mean, 1 when even)."""
    if dp_size == 1 or not dist.is_initialized():
        return groups, {}
    loads: list = [None] * dp_size
    dist.all_gather_object(loads, [group_tokens(g) for g in groups], group=group)
    plan = swap_plan(loads)
    keep = {i for r, i in plan[dp_rank] if r == dp_rank}
    outgoing = {(dp_rank, i): g for i, g in enumerate(groups) if i not in keep}
    moved: list = [None] * dp_size
    dist.all_gather_object(moved, outgoing, group=group)
    arriving = {k: v for m in moved for k, v in m.items()}
    mine = [groups[i] if r == dp_rank else arriving[r, i] for r, i in plan[dp_rank]]
    before = [sum(row) for row in loads]
    after = [sum(loads[r][i] for r, i in p) for p in plan]
    mean = max(sum(before) / dp_size, 1.0)
    return mine, {"batch/dp_moved_groups": len(arriving), "batch/dp_imbalance_before": max(before) / mean,
                  "batch/dp_imbalance": max(after) / mean}
