import math
import random

import numpy as np
import pytest
import torch

from megatron_tr1.errors import CheckpointError
from megatron_tr1.rl import checkpoint as ckpt
from megatron_tr1.rl.checkpoint import CheckpointManager, TrainState, capture_rng, restore_rng


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def save(manager: CheckpointManager, state: TrainState, write_model=None):
    """A single-process save as the trainer makes one: stage, write the model files, commit."""
    staging = manager.staging_dir(state.step)
    if write_model is not None:
        write_model(staging)
    return manager.commit(staging, state)


def _write_model(tensor):
    def write(folder):
        torch.save({"w": tensor}, folder / "model.pt")
    return write


def test_round_trip_with_model_files_and_rng(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = TrainState(step=3, epoch=1, index=5, rng=capture_rng(),
                       extra={"scheduler": {"last_step": 3}, "nan_guard": {"skipped": 1}, "t": torch.arange(4)},
                       metrics=[{"step": 1, "loss": 1.5}, {"step": 2, "loss": math.nan}])
    expected = _draw()
    path = save(manager, state, _write_model(torch.ones(2)))
    assert path == tmp_path / "ckpt" / "step_000003" and (path / ckpt.MARKER).is_file()
    assert torch.load(path / "model.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]

    _draw()  # move every generator on
    loaded = manager.load(manager.latest())
    assert (loaded.step, loaded.epoch, loaded.index) == (3, 1, 5)
    assert loaded.metrics == [{"step": 1, "loss": 1.5}, {"step": 2, "loss": None}]
    assert loaded.extra["scheduler"] == {"last_step": 3} and loaded.extra["t"].tolist() == [0, 1, 2, 3]
    restore_rng(loaded.rng)
    assert _draw() == expected


def test_interrupted_saves_never_look_complete(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    good = save(manager, TrainState(step=1))

    def crash(folder):  # the model writer dies half-way
        (folder / "model.pt").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(manager, TrainState(step=2), crash)
    assert manager.latest() == good and not manager.step_dir(2).exists()

    with monkeypatch.context() as m:  # dies after COMPLETE is written (all fsynced), before the rename
        m.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            save(manager, TrainState(step=3))
        assert not manager.step_dir(3).exists()
    third = manager.latest()  # the complete staging copy is put in place: that save did finish
    assert third == manager.step_dir(3) and manager.load(third).step == 3

    manager.step_dir(4).mkdir()  # a step folder without the marker (e.g. copied by hand, or torn)
    (manager.step_dir(4) / ckpt.STATE_JSON).write_text("{}")
    assert manager.latest() == third
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        manager.resolve(str(manager.step_dir(4)))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.load(manager.step_dir(4))

    assert manager.resolve("latest") == third
    save(manager, TrainState(step=5))  # a successful save clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000003", "step_000005"]


def test_keep_last_and_resave(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        save(manager, TrainState(step=step, index=step))
    assert [p.name for p in manager.complete()] == ["step_000003", "step_000004"]
    save(manager, TrainState(step=4, index=40))  # the same step again replaces it
    assert manager.load(manager.latest()).index == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]


def test_resolve_and_unsafe_pickles(tmp_path):
    manager = CheckpointManager(tmp_path / "none")
    assert manager.resolve(None) is None and manager.resolve("latest") is None
    with pytest.raises(CheckpointError, match=r"--resume \(checkpoint.resume\) '/nope': the folder does not exist"):
        manager.resolve("/nope")
    manager = CheckpointManager(tmp_path / "c")
    path = save(manager, TrainState(step=1, extra={"obj": CheckpointManager(tmp_path)}))
    with pytest.raises(CheckpointError, match="unreadable trainer state"):  # weights_only refuses arbitrary objects
        manager.load(path)
