"""A run killed (kill -9) in the middle of a checkpoint save, or stopped with SIGTERM, loses nothing: ``--resume
auto`` continues from the newest complete checkpoint and logs exactly the metrics of a run that was never stopped.
Real processes (``python -m megatron_tr1.cli train``), so these are slow: ``pytest -m slow tests/faults``."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rl import _trainer_cases

pytestmark = pytest.mark.slow
ARGS = [*_trainer_cases.TINY_RUN, "stages.base.enabled=false", "stages.grpo.enabled=false", "stages.sft.steps=6",
        "checkpoint.every=1", "eval.max_samples=2"]


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_tr1.cli", "train", "--run-dir", str(run_dir), *ARGS,
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    _finish(_train(root / "straight"))
    return root


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment to stop it"
        assert time.monotonic() - start < timeout
        time.sleep(0.005)


def test_kill_9_during_a_save_then_resume_auto(straight):
    run = straight / "killed"
    shutil.copytree(straight / "straight" / "data", run / "data")  # the same videos (H.264 is not repeatable)
    ckpts = run / "checkpoints" / "sft"
    proc = _train(run)
    # step 3's save is under way: its staging folder exists and has no COMPLETE yet
    _wait_for(lambda: ckpts.is_dir() and any(p.name.startswith("step_000003.tmp-") for p in ckpts.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in ckpts.iterdir())
    assert "step_000002" in left and "step_000003" not in left, left
    _finish(_train(run, "--resume", "auto"))
    assert _trainer_cases.metrics(run) == _trainer_cases.metrics(straight / "straight")


def test_sigterm_saves_and_resume_auto_continues(straight):
    run = straight / "stopped"
    shutil.copytree(straight / "straight" / "data", run / "data")
    proc = _train(run)
    metrics = run / "stages" / "sft" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "interrupted: checkpoint saved" in out and not (run / "DONE").exists()
    _finish(_train(run, "--resume", "auto"))
    assert _trainer_cases.metrics(run) == _trainer_cases.metrics(straight / "straight")
