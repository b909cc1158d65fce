"""A stage's checkpoints as the trainer uses them: which one to resume, saving on every rank, loading with resharding.

- ``resume_path(resume, stage, manager)``: ``--resume auto`` -> the newest complete checkpoint of the stage (or a
  fresh start); an explicit ``RUN/checkpoints/<stage>/step_N`` -> that folder for its stage (a path that is not
  a complete checkpoint under a stage folder is an error, never a silent fresh start).
- ``save(manager, state, model, optimizer, hf_dir, healthy)``: every rank writes its model shard and optimizer
  state into the staging folder, rank 0 commits (``rl.checkpoint``). A step whose weights hold NaN or inf on any
  rank is not saved (logged): no checkpoint is ever a diverged one. A write that fails (a full disk) on any rank
  removes the staging folder on every rank and raises one ``CheckpointError`` naming the folder and the cause;
  the complete checkpoints already there are untouched.
- ``load(path, model, optimizer, reset_optimizer)``: model shards (resharded by ``convert`` if saved at another
  TP x PP; checksummed and finite), the optimizer state when the layout matches (``reset_optimizer``: fresh
  moments instead), RNG and trainer state.
"""
from __future__ import annotations

import errno
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tr1.convert.checkpoint import read_meta
from megatron_tr1.convert.weights import load_weights, nonfinite, save_weights
from megatron_tr1.distributed import is_rank0
from megatron_tr1.errors import CheckpointError
from megatron_tr1.rl import optimizer_state
from megatron_tr1.rl.checkpoint import CheckpointManager, TrainState, capture_rng
from megatron_tr1.rl.config import STAGES

log = logging.getLogger(__name__)


def all_ranks(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce)."""
    flag = torch.tensor([1.0 if ok else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resume_path(resume: str | None, stage: str, manager: CheckpointManager) -> Path | None:
    """The checkpoint ``stage`` resumes from (see the module docstring)."""
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        return manager.latest()
    path = Path(resume)
    if path.parent.name not in STAGES:
        raise CheckpointError(f"--resume (checkpoint.resume) {resume!r}: not a checkpoint of a stage (expected "
                              f"RUN/checkpoints/<stage>/step_N with <stage> one of {', '.join(STAGES)}); pass such "
                              f"a folder or 'auto'")
    CheckpointManager(path.parent).resolve(str(path))  # complete, or a CheckpointError saying why not
    if path.parent.name != stage:
        return None  # a path names one stage's checkpoint; other stages start fresh
    return manager.resolve(str(path))


def _full_disk(e: OSError, where: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"the disk is full (writing {e.filename or where})"
    return f"{type(e).__name__}: {e}"


def save(manager: CheckpointManager, state: TrainState, model, optimizer, hf_dir: Path, healthy: bool = True
         ) -> Path | None:
    """Write a checkpoint of ``state.step`` (collective over every rank); the folder, or None when not saved."""
    bad = nonfinite(model)
    if not all_ranks(not bad):
        log.error("step %d: the weights hold NaN or inf (%s); not saving a checkpoint", state.step,
                  ", ".join(bad[:3]) or "on another rank")
        return None
    tag = torch.tensor([int(time.time() * 1000) % 2 ** 31])
    if dist.is_initialized():
        dist.broadcast(tag, 0)
    staging = manager.staging_path(state.step, str(int(tag)))
    error = None
    if is_rank0():
        try:
            manager.staging_dir(state.step, str(int(tag)))
        except OSError as e:
            error = _full_disk(e, staging)
    if all_ranks(error is None):  # every rank takes the same branches: the collectives stay matched
        try:
            save_weights(model, staging / "model", hf_dir)
            optimizer_state.save_optimizer_state(optimizer, staging)
        except OSError as e:
            error = _full_disk(e, staging)
        if all_ranks(error is None) and is_rank0():
            try:
                state.rng = capture_rng()
                manager.commit(staging, state, healthy=healthy)
            except OSError as e:
                error = _full_disk(e, staging)
    if not all_ranks(error is None):
        if is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{staging}: saving step {state.step} failed: {error or 'on another rank'}; nothing "
                              f"of it was kept (the newest complete checkpoint is {manager.latest() or 'none'}); "
                              f"free space and resume with --resume auto")
    return manager.step_dir(state.step)


def load(path: Path, model, optimizer, reset_optimizer: bool = False) -> TrainState:
    """Model shards, optimizer state, RNG and trainer state of the complete checkpoint ``path``."""
    state = CheckpointManager(path.parent).load(path)
    load_weights(model, path / "model")
    meta = read_meta(path / "model")
    stored, ours = optimizer_state.saved_layout(path, meta.tp, meta.pp), optimizer_state.layout()
    if reset_optimizer:
        log.warning("%s: weights loaded%s; the optimizer state starts fresh (checkpoint.reset_optimizer=true)",
                    path, "" if stored == ours else " (resharded from TP=%d x PP=%d x DP=%d)" % tuple(stored))
    elif stored == ours:
        optimizer_state.load_optimizer_state(optimizer, path)
    else:
        raise CheckpointError(
            f"{path}: saved at TP={stored[0]} x PP={stored[1]} x DP={stored[2]}, this run is TP={ours[0]} x "
            f"PP={ours[1]} x DP={ours[2]}. The weights reshard (convert/), but the Adam moments are stored as "
            f"each rank's shard of megatron's distributed optimizer, which does not map onto another layout; "
            f"resume with the saved layout, or pass checkpoint.reset_optimizer=true to continue from the "
            f"resharded weights with fresh moments")
    return state
