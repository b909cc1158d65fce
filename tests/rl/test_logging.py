import json
import logging
import math

import pytest
import torch

from megatron_tr1.rewards import tvg_reward
from megatron_tr1.rl.guards import NanGuard, TrainingDiverged, safe_reward
from megatron_tr1.rl.logger import METRICS_FILE, MetricsLogger, ProgressBar, read_metrics
from megatron_tr1.rl.plots import ema, plot_training, series

GOOD = '<think>x</think><answer>{"start_time": "1.0", "end_time": "3.0"}</answer>'


def test_jsonl_round_trip_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True, fsync=True) as logger:
        logger.log(1, {"reward/mean": 0.5, "loss": torch.tensor(0.25), "stage": "grpo", "kl": math.nan})
        logger.log(2, {"reward/mean": 0.75, "loss": 0.125, "stage": "grpo", "kl": 0.01})
    records = read_metrics(tmp_path / METRICS_FILE)
    assert records == [{"step": 1, "reward/mean": 0.5, "loss": 0.25, "stage": "grpo", "kl": None},
                       {"step": 2, "reward/mean": 0.75, "loss": 0.125, "stage": "grpo", "kl": 0.01}]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    assert "stage" not in acc.Tags()["scalars"]


def test_resume_drops_records_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=2) as logger:
        logger.log(3, {"loss": 30})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1), (2, 2), (3, 30)]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # a fresh run starts a fresh file
        logger.log(1, {"loss": 7})
    assert read_metrics(path) == [{"step": 1, "loss": 7}]


def test_wandb_enabled_but_missing_only_warns(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with caplog.at_level(logging.WARNING), MetricsLogger(tmp_path, tensorboard=False, wandb=True) as logger:
        logger.log(1, {"loss": 1.0})
    assert "wandb is not installed" in caplog.text


def test_progress_bar_counts_steps():
    bar = ProgressBar(total=5, desc="grpo", initial=2, enabled=True)
    bar.update({"reward/mean": 0.5, "loss": 0.1, "other": 3})
    assert bar._bar.n == 3 and bar._bar.total == 5
    bar.close()


def test_plots_write_pngs(tmp_path):
    think = [{"step": s, "reward/mean": s / 10, "response_length/mean": 50 - s} for s in range(1, 11)]
    no_think = [{"step": s, "reward/mean": s / 20, "response_length/mean": None} for s in range(1, 11)]
    files = plot_training({"grpo": think, "grpo (no think)": no_think}, tmp_path / "plots")
    assert [f.name for f in files] == ["reward.png", "response_length.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 1000
    assert plot_training({"x": [{"step": 1}]}, tmp_path / "none") == []
    assert series(no_think, "response_length/mean") == ([], [])
    assert ema([1.0, 3.0, 3.0], alpha=0.5) == [1.0, 2.0, 2.5]


def test_safe_reward_scores_failures_zero():
    assert safe_reward(tvg_reward, GOOD, (1.0, 3.0), 10.0) == (tvg_reward(GOOD, (1.0, 3.0), 10.0), False)

    def broken(response, gt, duration):
        raise KeyError("boom")

    assert safe_reward(broken, GOOD, (1.0, 3.0), 10.0) == ({"overall": 0.0, "format": 0.0, "accuracy": 0.0}, True)
    assert safe_reward(lambda *a: {"overall": math.nan}, GOOD, (1.0, 3.0), 10.0)[1] is True
    assert safe_reward(lambda *a: 1.0, GOOD, (1.0, 3.0), 10.0)[1] is True


def test_nan_guard_skips_then_stops(caplog):
    guard = NanGuard(max_consecutive=3)
    with caplog.at_level(logging.WARNING):
        assert guard.check(0.5, step=1)
        assert not guard.check(math.nan, step=2)
        assert not guard.check(math.inf, step=3)
        assert guard.check(0.4, step=4)  # a finite loss resets the run of NaNs
        assert not guard.check(math.nan, step=5) and not guard.check(math.nan, step=6)
    assert "step 2: loss is nan; skipping the update (1 in a row, stop at 3)" in caplog.text
    with pytest.raises(TrainingDiverged, match="step 7: loss is nan for 3 consecutive steps"):
        guard.check(math.nan, step=7)
    restored = NanGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.consecutive, restored.skipped) == (3, 5)
