import time

import pytest
import torch

from megatron_tr1.rl.stats import StepTimer, length_stats, logprob_mismatch, reward_stats


def test_reward_and_length_stats():
    rewards = [{"overall": o, "format": f, "accuracy": a}
               for o, f, a in [(1.0, 1, 1.0), (0.5, 1, 0.0), (0.75, 1, 0.5), (0.75, 1, 0.5)]]
    s = reward_stats(rewards, failed=[False, True, False, False], n=2)
    assert s["reward/mean"] == 0.75 and s["reward/std"] == pytest.approx(0.1767767, abs=1e-6)
    assert (s["reward/format"], s["reward/accuracy"], s["reward/failed"]) == (1.0, 0.5, 1)
    assert s["reward/zero_spread_groups"] == 0.5  # the second group is [0.75, 0.75]
    assert length_stats([10, 20, 30, 40], [False, False, False, True]) == {
        "response_length/mean": 25.0, "response_length/min": 10.0, "response_length/max": 40.0,
        "response_length/clip_frac": 0.25}


def test_logprob_mismatch_over_masked_tokens():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, 0.0]])
    trainer = torch.tensor([[-1.1, -2.0, -9.0], [-0.25, -9.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    s = logprob_mismatch(engine, trainer, mask)
    assert s["logprob_mismatch/mean"] == pytest.approx(0.0875) and s["logprob_mismatch/max"] == pytest.approx(0.25)
    assert logprob_mismatch(engine, trainer, torch.zeros(2, 3))["logprob_mismatch/max"] == 0.0


def test_step_timer_accumulates_phases():
    calls = []
    timer = StepTimer(sync=lambda: calls.append(1))
    with timer("rollout"):
        time.sleep(0.02)
    with timer("rollout"):
        pass
    with timer("update"):
        pass
    s = timer.stats(tokens=100)
    assert s["time/rollout"] >= 0.02 and s["time/step"] == pytest.approx(s["time/rollout"] + s["time/update"])
    assert s["tokens_per_s"] == pytest.approx(100 / s["time/step"]) and len(calls) == 6
