"""Faults that must not lose a run's checkpoints or numbers: corrupted or non-finite weights, a NaN streak, a crash
between the renames of a re-save, a mistyped --resume path, a full disk, a truncated optimizer file."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_tr1.cli import main as tr1
from megatron_tr1.convert import integrity
from megatron_tr1.errors import CheckpointError
from megatron_tr1.launch import run_ranks
from megatron_tr1.rl import checkpoint as ckpt
from megatron_tr1.rl import optimizer_state, stage_checkpoint
from megatron_tr1.rl.checkpoint import CheckpointManager, TrainState

from tests.faults import _ckpt_cases as cases


def save(manager, step, healthy=True):
    staging = manager.staging_dir(step)
    return manager.commit(staging, TrainState(step=step), healthy=healthy)


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    (path,) = run_ranks(cases.write_checkpoint, 1, str(root), timeout=300)
    return Path(path)


def test_checkpoints_record_a_checksum_per_file(good_ckpt):
    weights = good_ckpt / "mp_rank_00_000" / "model.safetensors"
    assert json.loads((good_ckpt / "tr1_mcore.json").read_text())["checksums"] == "sha256"
    line = integrity.sidecar(weights).read_text().split()
    assert line == [integrity.digest(weights), "model.safetensors"]  # sha256sum -c reads it


def test_flipped_bytes_are_refused_by_load_eval_and_convert(good_ckpt, tmp_path, capsys):
    bad = tmp_path / "flipped"
    shutil.copytree(good_ckpt, bad)
    weights = bad / "mp_rank_00_000" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 2000):  # 2,000 bytes inside the tensor data
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    (message,) = run_ranks(cases.load_checkpoint, 1, str(bad), timeout=300)
    assert message and str(weights) in message and "corrupted" in message
    assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(bad), "--out", str(tmp_path / "hf"),
                "--no-progress"]) == 2
    assert "corrupted" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    integrity.sidecar(weights).unlink()
    (message,) = run_ranks(cases.load_checkpoint, 1, str(bad), timeout=300)
    assert "checksum model.safetensors.sha256 is missing" in message


def test_nan_weights_are_refused(tmp_path):
    (path,) = run_ranks(cases.write_checkpoint, 1, str(tmp_path), True, timeout=300)
    (message,) = run_ranks(cases.load_checkpoint, 1, path, timeout=300)
    assert message and "final_layernorm" in message and "NaN or inf" in message


def test_a_nan_streak_never_prunes_the_newest_healthy_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    save(manager, 1)
    save(manager, 2)
    for step in (3, 4, 5):  # saved while the loss was NaN (the guard skipped those updates)
        save(manager, step, healthy=False)
    assert [p.name for p in manager.complete()] == ["step_000002", "step_000004", "step_000005"]
    assert manager.latest_healthy() == manager.step_dir(2)
    save(manager, 6)  # healthy again: the old healthy one may go
    assert [p.name for p in manager.complete()] == ["step_000005", "step_000006"]


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    manager = CheckpointManager(tmp_path)
    assert stage_checkpoint.save(manager, TrainState(step=1), model, None, tmp_path) is None
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("left", [("tmp", "old"), ("old",), ("tmp",)])
def test_a_crash_between_the_renames_of_a_resave_loses_nothing(tmp_path, left):
    """``commit`` re-saving step 4: ``step_4 -> step_4.old-P``, then ``step_4.tmp-T -> step_4``. A crash between
    them leaves no ``step_4``; with keep_last=1 the complete copy must be found again, not pruned."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    save(manager, 3)
    first = save(manager, 4)
    staged = manager.staging_dir(4, "9")  # the new save of step 4, complete, not yet renamed in
    for name in (ckpt.STATE_JSON, ckpt.STATE_PT, ckpt.STATE_JSON + ".sha256", ckpt.STATE_PT + ".sha256"):
        (staged / name).write_bytes((first / name).read_bytes())
    (staged / "new").write_text("new")
    (staged / ckpt.MARKER).write_text("step 4\n")
    os.replace(first, tmp_path / "step_000004.old-123")  # the first rename happened, the second did not
    for kind, path in (("tmp", staged), ("old", tmp_path / "step_000004.old-123")):
        if kind not in left:
            shutil.rmtree(path)
    assert manager.latest() == manager.step_dir(4)
    assert manager.load(manager.latest()).step == 4
    assert (manager.step_dir(4) / "new").exists() == ("tmp" in left)  # the newer save wins
    manager.prune()
    assert [p.name for p in tmp_path.iterdir()] == ["step_000004"]


def test_a_mistyped_resume_path_is_an_error(tmp_path):
    manager = CheckpointManager(tmp_path / "run/checkpoints/sft")
    save(manager, 2)
    with pytest.raises(CheckpointError, match="not a checkpoint of a stage"):
        stage_checkpoint.resume_path(str(tmp_path / "run/checkpoints/step_000002"), "sft", manager)
    with pytest.raises(CheckpointError, match="the folder does not exist"):
        stage_checkpoint.resume_path(str(tmp_path / "run/checkpoints/sft/step_000003"), "sft", manager)
    with pytest.raises(CheckpointError, match="does not exist"):  # checked even while another stage runs
        stage_checkpoint.resume_path(str(tmp_path / "run/checkpoints/grpo/step_000009"), "sft", manager)
    assert stage_checkpoint.resume_path(str(manager.step_dir(2)), "sft", manager) == manager.step_dir(2)
    assert stage_checkpoint.resume_path(str(manager.step_dir(2)), "grpo", manager) is None


def test_a_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    kept = save(manager, 1)

    def full(model, out, hf_dir):
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "model.safetensors"))
    monkeypatch.setattr(stage_checkpoint, "save_weights", full)
    with pytest.raises(CheckpointError, match=r"saving step 2 failed: the disk is full \(writing .*model.safetensors"):
        stage_checkpoint.save(manager, TrainState(step=2), torch.nn.Linear(2, 2), None, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [kept.name] and manager.latest() == kept


def test_a_truncated_optimizer_file_is_named(tmp_path):
    path = tmp_path / "optim_tp00_pp000_dp000.pt"
    torch.save({"x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])  # an old checkpoint without checksums, truncated
    monkey_file = optimizer_state._file
    optimizer_state._file = lambda: path.name
    try:
        with pytest.raises(CheckpointError, match=r"optim_tp00_pp000_dp000.pt: unreadable optimizer state"):
            optimizer_state.load_optimizer_state(None, tmp_path)
        integrity.write_checksum(path)
        (tmp_path / "trainer_state.json.sha256").write_text("x")  # a checkpoint with checksums
        path.write_bytes(path.read_bytes()[:50])
        with pytest.raises(CheckpointError, match="corrupted"):
            optimizer_state.load_optimizer_state(None, tmp_path)
    finally:
        optimizer_state._file = monkey_file


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_convert_never_replaces_its_own_input_even_with_force(good_ckpt, tmp_path, capsys, direction):
    """--out that is the input folder, or a folder that contains it, is refused whatever --force says."""
    src = tmp_path / "parent" / "input"
    if direction == "hf-to-mcore":
        assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(good_ckpt), "--out", str(src), "--no-progress"]) == 0
        flag = "--hf-dir"
    else:
        shutil.copytree(good_ckpt, src)
        flag = "--mcore-dir"
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for out, what in ((src, "is the input folder"), (src.parent, f"contains the input folder {src}")):
        assert tr1(["convert", direction, flag, str(src), "--out", str(out), "--force", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{out}: --out {what}" in err and "even with --force" in err
        assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # nothing deleted


def test_converted_checkpoints_carry_checksums_too(good_ckpt, tmp_path):
    hf = tmp_path / "hf"
    assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(good_ckpt), "--out", str(hf), "--no-progress"]) == 0
    assert tr1(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2",
                "--no-progress"]) == 0
    meta = json.loads((tmp_path / "mc" / "tr1_mcore.json").read_text())
    assert meta["checksums"] == "sha256"
    for rank, files in meta["files"].items():
        for f in files:
            integrity.verify_checksum(tmp_path / "mc" / rank / f)  # raises when missing or different
