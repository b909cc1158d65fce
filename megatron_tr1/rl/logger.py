"""Per-step metrics: ``metrics.jsonl``, TensorBoard, optional W&B, and a progress bar with ETA.

``metrics.jsonl`` holds one JSON object per step, ``{"step": k, name: value, ...}``, appended and flushed at
each step (``fsync=True`` also forces it to disk); non-finite numbers are written as ``null``. A new run
(``resume_step=None``) starts the file afresh; a resumed one (``resume_step=k``) first drops the records after
step ``k`` (written by the run that died after its last checkpoint), so the file reads as if the run had not
stopped. Only rank 0 should log.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: str | Path, step: int) -> int:
    """Rewrite ``path`` (atomically) without records after ``step`` and without a torn line; returns how many
    records went."""
    path = Path(path)
    records = read_metrics(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if len(keep) != len([line for line in lines if line.strip()]):  # later steps or a torn line
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, path)
    return len(records) - len(keep)


class MetricsLogger:
    """Writes each step's scalars to the enabled sinks under ``run_dir``."""

    def __init__(self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "megatron-tr1", config: dict | None = None, resume_step: int | None = None,
                 fsync: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.fsync = fsync
        if resume_step is not None:
            dropped = truncate_after(self.path, resume_step)
            if dropped:
                log.info("dropped %d metrics records after step %d (logged after the resumed checkpoint)",
                         dropped, resume_step)
        mode = "w" if resume_step is None else "a"  # a fresh run starts a fresh file
        self._file = open(self.path, mode, encoding="utf-8") if jsonl else None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                log.warning("logging.wandb=true but wandb is not installed (pip install wandb); not logging to W&B")
            else:
                self._wandb = wandb_lib.init(project=wandb_project, config=config, dir=str(self.run_dir),
                                             resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Record ``metrics`` for ``step``; numbers go to TensorBoard/W&B, everything JSON-able to the file.
        Returns the record written."""
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar over optimizer steps (rate and ETA from tqdm) showing a few metrics; no-op when disabled."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True,
                 show: tuple[str, ...] = ("reward/mean", "response_length/mean", "loss")):
        self.show = show
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not enabled)

    def update(self, metrics: dict[str, Any], steps: int = 1) -> None:
        shown = {k.split("/")[0]: f"{v:.3g}" for k, v in metrics.items()
                 if k in self.show and isinstance(v, (int, float))}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
