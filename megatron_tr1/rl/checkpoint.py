"""Atomic checkpoints of the training state around the model: step, data position, RNG, extra state, metrics.

Layout: ``ROOT/step_000123/`` holding ``trainer_state.json`` (step, epoch, index, metrics, healthy),
``trainer_state.pt`` (RNG states and the ``extra`` dict; loaded with ``torch.load(weights_only=True)``), what the
trainer wrote (model shards, each rank's optimizer state), every file with its SHA-256 beside it
(``convert.integrity``; checked before the file is used), and ``COMPLETE``, written last.

A save writes everything into ``ROOT/step_000123.tmp-<tag>/``, fsyncs it, writes ``COMPLETE``, then renames the
folder into place, so a save interrupted at any point leaves either no ``step_*`` folder or one without
``COMPLETE``; ``latest`` and ``load`` ignore or reject those. Saving a step that already has a folder (a resumed
run saving its step again) moves the old one aside (``.old-``) before renaming the new one in; a crash between the
two renames leaves a complete ``.tmp-`` or ``.old-`` copy and no ``step_*`` folder, which ``complete()`` puts back
(``recover``) before anything looks for or prunes checkpoints. With several ranks, every rank writes into
``staging_dir(step, tag)`` with a tag agreed across ranks (broadcast from rank 0), then after a barrier rank 0
alone calls ``commit``.

Pruning keeps the newest ``keep_last`` complete checkpoints and, besides them, the newest *healthy* one (saved
when the last step's loss was finite): checkpoints written during a NaN streak never push out the one to resume
from.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_tr1.convert import integrity
from megatron_tr1.convert.checkpoint import TRAIN_MARKER, TRAIN_STATE
from megatron_tr1.errors import CheckpointError

MARKER, STATE_JSON = TRAIN_MARKER, TRAIN_STATE  # convert.model_dir recognises a training checkpoint by them
STATE_PT = "trainer_state.pt"
FORMAT_VERSION = 2  # 2: checksums and the healthy flag; 1 (no checksums) is still read
READS = (1, 2)
_STEP_DIR = re.compile(r"step_(\d+)")
_ASIDE = re.compile(r"(step_\d+)\.(tmp|old)-.+")


@dataclasses.dataclass
class TrainState:
    """What a resumed run needs besides the model and optimizer tensors.

    ``epoch`` and ``index``: the position in the (seeded, per-epoch shuffled) train data of the next sample;
    ``rng``: from ``capture_rng``; ``extra``: tensors, numbers, strings, lists and dicts (e.g. the LR scheduler,
    ``NanGuard`` and dynamic-sampling counters); ``metrics``: the per-step records logged so far.
    """

    step: int = 0
    epoch: int = 0
    index: int = 0
    rng: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    metrics: list[dict] = dataclasses.field(default_factory=list)


def capture_rng() -> dict:
    """Python, NumPy, torch CPU (and CUDA, when initialised) generator states, in a ``weights_only``-safe form."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # CUDA in use (never on CPU)
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict) -> None:
    """Undo ``capture_rng``: set every generator it recorded."""
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root``, deepest first, then ``root``."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() or path.is_dir():
            _fsync(path)
    _fsync(root)


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None (strict JSON), recursively."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class CheckpointManager:
    """Save, find, load and prune checkpoints under ``root`` (``keep_last`` = 0 keeps all)."""

    def __init__(self, root: str | Path, keep_last: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def staging_path(self, step: int, tag: str | None = None) -> Path:
        """Where a save of ``step`` stages its files (``tag`` defaults to the process id); not created."""
        return self.root / f"step_{step:06d}.tmp-{tag if tag is not None else os.getpid()}"

    def staging_dir(self, step: int, tag: str | None = None) -> Path:
        """``staging_path``, created empty (one rank creates it; the others write into ``staging_path``)."""
        path = self.staging_path(step, tag)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, state: TrainState, healthy: bool = True) -> Path:
        """Write the trainer state into ``staging`` (with checksums), fsync, mark it complete, rename it into place,
        prune. ``healthy``: the last step's loss was finite (see the module docstring)."""
        json_state = {"format_version": FORMAT_VERSION, "step": state.step, "epoch": state.epoch,
                      "index": state.index, "healthy": bool(healthy), "metrics": _json_safe(state.metrics)}
        (staging / STATE_JSON).write_text(json.dumps(json_state, allow_nan=False) + "\n", encoding="utf-8")
        torch.save({"rng": state.rng, "extra": state.extra}, staging / STATE_PT)
        for name in (STATE_JSON, STATE_PT):
            integrity.write_checksum(staging / name)
        _fsync_tree(staging)
        with open(staging / MARKER, "w", encoding="utf-8") as f:
            f.write(f"step {state.step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(staging)
        final = self.step_dir(state.step)
        if final.exists():  # a second save of the same step replaces the first (a crash here loses only it)
            old = final.with_name(final.name + f".old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
        _fsync(self.root)
        self.prune(keep=final)
        return final

    def recover(self) -> list[Path]:
        """Put back the checkpoints a crash between ``commit``'s two renames left aside: for a step with no
        ``step_*`` folder, a complete ``.tmp-`` copy (the new save) or else a complete ``.old-`` one is renamed into
        place. Returns the folders recovered."""
        if not self.root.is_dir():
            return []
        aside: dict[str, list[Path]] = {}
        for p in self.root.iterdir():
            m = _ASIDE.fullmatch(p.name)
            if m and p.is_dir() and (p / MARKER).is_file() and not (self.root / m.group(1)).exists():
                aside.setdefault(m.group(1), []).append(p)
        recovered = []
        for name, copies in aside.items():
            best = sorted(copies, key=lambda p: ".tmp-" not in p.name)[0]  # the newer save first
            os.replace(best, self.root / name)
            recovered.append(self.root / name)
        if recovered:
            _fsync(self.root)
        return recovered

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest step first (after ``recover``)."""
        if not self.root.is_dir():
            return []
        self.recover()
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str | None) -> Path | None:
        """``checkpoint.resume``: None -> None; ``"latest"`` -> ``latest()`` (None if there is none yet);
        a folder -> that folder, which must be complete (``CheckpointError`` otherwise)."""
        if resume is None:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / MARKER).is_file():
            what = "does not exist" if not path.exists() else f"has no {MARKER} marker (an interrupted save)"
            raise CheckpointError(f"--resume (checkpoint.resume) {resume!r}: the folder {what}; pass a complete "
                                  f"RUN/checkpoints/<stage>/step_N folder or 'auto'")
        return path

    def latest_healthy(self) -> Path | None:
        """The newest complete checkpoint saved after a finite loss, or None."""
        return next((p for p in reversed(self.complete()) if self.healthy(p)), None)

    def healthy(self, path: Path) -> bool:
        """Whether ``path`` was saved after a finite loss (checkpoints of format 1 count as healthy)."""
        try:
            return bool(json.loads((path / STATE_JSON).read_text(encoding="utf-8")).get("healthy", True))
        except (OSError, ValueError):
            return False

    def load(self, path: str | Path) -> TrainState:
        """Read the trainer state of a complete checkpoint (the model files are the trainer's to read)."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
        checked = integrity.verify_checksum(path / STATE_JSON, required=False)
        try:
            meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / STATE_JSON}: unreadable trainer state ({e})") from None
        if meta.get("format_version") not in READS:
            raise CheckpointError(f"{path / STATE_JSON}: format_version {meta.get('format_version')!r}, "
                                  f"this version reads {', '.join(map(str, READS))}")
        if meta["format_version"] >= 2 and not checked:
            integrity.verify_checksum(path / STATE_JSON)  # raises: its checksum is missing
        integrity.verify_checksum(path / STATE_PT, required=meta["format_version"] >= 2)
        try:
            blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path / STATE_PT}: unreadable trainer state ({e})") from None
        return TrainState(step=meta["step"], epoch=meta["epoch"], index=meta["index"], rng=blob["rng"],
                          extra=blob["extra"], metrics=meta["metrics"])

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints, and leftover staging folders of
        interrupted saves (a ``step_*`` folder without ``COMPLETE`` or a ``*.tmp-*`` one). Returns what went."""
        if not self.root.is_dir():
            return []
        removed = []
        done = self.complete()
        if self.keep_last:
            spare = {keep, next((p for p in reversed(done) if self.healthy(p)), None)}
            removed += [p for p in done[: -self.keep_last] if p not in spare]
        removed += [p for p in self.root.iterdir() if p.is_dir() and p not in done and p != keep
                    and (_STEP_DIR.fullmatch(p.name) or ".tmp-" in p.name or ".old-" in p.name)]
        for p in removed:
            shutil.rmtree(p)
        return removed
