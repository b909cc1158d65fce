"""Training data-parallel ranks balanced by tokens (``rl.balance``): the swap plan, and a DP = 2 GRPO step that
moves a group to the short rank, evens the tokens and reaches the same weights as without balancing."""
import functools

import numpy as np
import pytest

from megatron_tr1.launch import run_ranks
from megatron_tr1.rl.balance import swap_plan

from tests.rl import _balance_cases as cases


def _sums(loads, plan):
    return [sum(loads[r][i] for r, i in p) for p in plan]


def test_even_loads_move_nothing():
    loads = [[5, 3], [4, 4], [8, 0]]
    assert swap_plan(loads) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(2, 0), (2, 1)]]


def test_one_swap_evens_two_replicas():
    loads = [[58, 42], [10, 26]]
    plan = swap_plan(loads)
    # 58 <-> 26 and 42 <-> 10 both even them; the first in (replica, index) order is taken
    assert plan == [[(0, 1), (1, 1)], [(0, 0), (1, 0)]] and _sums(loads, plan) == [68, 68]


@pytest.mark.parametrize("seed", range(5))
def test_plans_keep_counts_move_every_group_once_and_narrow_the_widest_gap(seed):
    rng = np.random.default_rng(seed)
    loads = [[int(x) for x in rng.integers(100, 4000, size=4)] for _ in range(4)]
    loads[0] = [x * 3 for x in loads[0]]  # one replica far heavier
    plan = swap_plan(loads)
    assert [len(p) for p in plan] == [4] * 4
    assert sorted(g for p in plan for g in p) == [(r, i) for r in range(4) for i in range(4)]
    before, after = [sum(row) for row in loads], _sums(loads, plan)
    assert max(after) - min(after) < max(before) - min(before)
    assert swap_plan(loads) == plan  # deterministic: tensor and pipeline peers agree


def test_a_dp2_step_balances_tokens_and_reaches_the_same_weights():
    runs = {b: run_ranks(functools.partial(cases.balance_case, balance=b), 2, timeout=600) for b in (False, True)}
    plain, balanced = runs[False], runs[True]
    p = balanced[0]["prompt"]
    m = balanced[0]["metrics"]
    assert m["batch/dp_moved_groups"] == 2  # rank 0's 58-token group for rank 1's 26-token one
    assert m["batch/dp_imbalance_before"] == pytest.approx((58 + 42 + 8 * p) / ((58 + 42 + 10 + 26) / 2 + 8 * p))
    assert m["batch/dp_imbalance"] == pytest.approx(1.0)
    tokens = [r["metrics"]["batch/tokens"] for r in balanced]
    assert tokens[0] == tokens[1] == 68 + 8 * p
    assert [r["metrics"]["batch/tokens"] for r in plain] == [100 + 8 * p, 36 + 8 * p]
    assert "batch/dp_moved_groups" not in plain[0]["metrics"]
    for k, v in plain[0]["params"].items():  # the update's loss is normalised over all ranks: the same gradient
        np.testing.assert_allclose(balanced[0]["params"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert all(np.array_equal(balanced[0]["params"][k], balanced[1]["params"][k]) for k in plain[0]["params"])
