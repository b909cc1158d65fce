"""Conversion on disk: HF -> tr1 Megatron shards -> HF, resharding on load, and bad input through ``tr1``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from megatron_tr1.cli import main as tr1
from megatron_tr1.convert import integrity
from megatron_tr1.convert.checkpoint import load_mcore_state, read_meta
from megatron_tr1.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_tr1.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_tr1.convert.storage import SafetensorsDir
from megatron_tr1.errors import CheckpointError, ConfigError


def _hf_tensors(path) -> dict[str, torch.Tensor]:
    return dict(SafetensorsDir(path).items())


def _text_logits(model, seed=0) -> torch.Tensor:
    ids = torch.randint(16, model.config.text_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True])
def test_cli_round_trip_at_tp2_pp2_loads_in_hf_with_equal_weights_and_logits(hf_dir, tmp_path, tied, capsys):
    src = hf_dir(tied=tied)
    assert tr1(["convert", "hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc"), "--tp", "2",
                "--pp", "2", "--no-progress"]) == 0
    assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "hf"),
                "--no-progress"]) == 0
    assert "peak RSS" in capsys.readouterr().out
    meta = read_meta(tmp_path / "mc")
    assert (meta.tp, meta.pp, meta.tied_embeddings, meta.dtype) == (2, 2, tied, "float32")
    assert sorted(meta.files) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    original, back = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert {"config.json", "generation_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(src)
    assert torch.equal(_text_logits(model.eval()), _text_logits(reference.eval()))


def test_large_checkpoints_are_written_and_read_as_indexed_shards(hf_dir, tmp_path):
    convert_hf_to_mcore(hf_dir(), tmp_path / "mc", tp=2, pp=1, shard_bytes=200_000, progress=False)
    meta = read_meta(tmp_path / "mc")
    assert len(meta.files["mp_rank_00_000"]) > 1
    assert (tmp_path / "mc" / "mp_rank_00_000" / "model.safetensors.index.json").is_file()
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "hf", shard_bytes=500_000, progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, back = _hf_tensors(hf_dir()), _hf_tensors(tmp_path / "hf")  # reads back through the index
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.mark.parametrize("stored,wanted", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (1, 2))])
def test_loading_at_another_layout_equals_converting_to_it_directly(hf_dir, tmp_path, stored, wanted):
    convert_hf_to_mcore(hf_dir(tied=True), tmp_path / "stored", *stored, spec="te", progress=False)
    convert_hf_to_mcore(hf_dir(tied=True), tmp_path / "direct", *wanted, progress=False)
    tp, pp = wanted
    for t in range(tp):
        for p in range(pp):
            got = load_mcore_state(tmp_path / "stored", t, tp, p, pp)
            direct = load_file(tmp_path / "direct" / f"mp_rank_{t:02d}_{p:03d}" / "model.safetensors")
            assert got.keys() == direct.keys()
            assert all(torch.equal(got[k], direct[k]) for k in direct), (t, p)


def test_te_spelling_and_dtype_are_applied_and_recorded(hf_dir, tmp_path):
    convert_hf_to_mcore(hf_dir(), tmp_path / "mc", 1, 1, dtype="bfloat16", spec="te", progress=False)
    meta = read_meta(tmp_path / "mc")
    assert (meta.spec, meta.dtype) == ("te", "bfloat16")
    stored = load_file(tmp_path / "mc" / "mp_rank_00_000" / "model.safetensors")
    assert "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in stored
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    te = load_mcore_state(tmp_path / "mc", 0, 1, 0, 1, spec="te")
    assert te.keys() == stored.keys()
    local = load_mcore_state(tmp_path / "mc", 0, 1, 0, 1)
    assert "language_model.decoder.layers.0.pre_mlp_layernorm.weight" in local


def _tr1_error(argv, capsys) -> str:
    assert tr1(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _copy_with(src, dst, edit_state=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_state:
        state = load_file(dst / "model.safetensors")
        edit_state(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_input_gives_one_clear_line_and_exit_2(hf_dir, tmp_path, capsys):
    src, out = hf_dir(), tmp_path / "out"
    convert = ["convert", "hf-to-mcore", "--out", str(out), "--no-progress", "--hf-dir"]
    err = _tr1_error(convert + [str(src), "--tp", "3"], capsys)
    assert "--tp 3 does not divide text_config.num_attention_heads=4" in err and "config.json" in err
    err = _tr1_error(convert + [str(src), "--pp", "3"], capsys)
    assert "--pp 3 does not divide text_config.num_hidden_layers=4" in err

    def drop(state):
        del state["model.layers.2.self_attn.k_proj.bias"], state["visual.merger.ln_q.weight"]
    missing = _copy_with(src, tmp_path / "missing", edit_state=drop)
    err = _tr1_error(convert + [str(missing)], capsys)
    assert "missing 2 tensor(s): model.layers.2.self_attn.k_proj.bias, visual.merger.ln_q.weight" in err

    def add(state):
        state["model.layers.4.mlp.up_proj.weight"] = torch.zeros(2)
    extra = _copy_with(src, tmp_path / "extra", edit_state=add)
    err = _tr1_error(convert + [str(extra)], capsys)
    assert "1 unexpected tensor(s): model.layers.4.mlp.up_proj.weight" in err

    def shrink(cfg):
        cfg["vision_config"]["intermediate_size"] = 64
    mismatch = _copy_with(src, tmp_path / "mismatch", edit_config=shrink)
    err = _tr1_error(convert + [str(mismatch)], capsys)
    assert "config mismatch: tensor visual.blocks.0.mlp.gate_proj.weight has shape (96, 64)" in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))  # failed conversions leave nothing

    assert tr1(convert + [str(src)]) == 0
    err = _tr1_error(convert + [str(src)], capsys)
    assert f"{out}: output exists and is not empty; pass --force" in err
    assert tr1(convert + [str(src), "--tp", "2", "--force"]) == 0
    assert read_meta(out).tp == 2

    err = _tr1_error(["convert", "mcore-to-hf", "--mcore-dir", str(src), "--out", str(tmp_path / "x")], capsys)
    assert "tr1_mcore.json: not found" in err
    weights = out / "mp_rank_01_000" / "model.safetensors"
    weights.unlink()
    err = _tr1_error(["convert", "mcore-to-hf", "--mcore-dir", str(out), "--out", str(tmp_path / "x")], capsys)
    assert "mp_rank_01_000/model.safetensors: missing; the checkpoint is incomplete" in err


def test_tools_scripts_run_the_same_conversion(hf_dir, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable}
    src = hf_dir()
    for script, args in (("convert_hf_to_mcore.sh", [src, tmp_path / "mc", "2", "1", "--no-progress"]),
                         ("convert_mcore_to_hf.sh", [tmp_path / "mc", tmp_path / "hf", "--no-progress"])):
        done = subprocess.run([str(root / "tools" / script), *map(str, args)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert read_meta(tmp_path / "mc").tp == 2
    original, back = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    usage = subprocess.run([str(root / "tools" / "verify.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "tools/verify.sh HF_DIR MCORE_DIR [TP PP]" in usage.stderr


def _rewrite(path, state):
    """Edit a converted shard on purpose: its checksum follows (else the load stops at the checksum)."""
    save_file(state, path)
    integrity.write_checksum(path)


def test_a_damaged_megatron_checkpoint_is_refused_naming_file_and_tensors(hf_dir, tmp_path):
    convert_hf_to_mcore(hf_dir(), tmp_path / "mc", 2, 1, progress=False)
    rank = tmp_path / "mc" / "mp_rank_01_000" / "model.safetensors"
    state = load_file(rank)
    state["vision.decoder.layers.7.mlp.linear_fc2.bias"] = torch.zeros(1)
    state["vision.merger.linear_fc1.bias"] = torch.zeros(3)  # wrong shard shape
    _rewrite(rank, state)
    with pytest.raises(CheckpointError, match=r"mp_rank_01_000: 1 unexpected tensor\(s\): "
                                              r"vision.decoder.layers.7.mlp.linear_fc2.bias"):
        load_mcore_state(tmp_path / "mc", 1, 2, 0, 1)
    del state["vision.decoder.layers.7.mlp.linear_fc2.bias"]
    _rewrite(rank, state)
    with pytest.raises(CheckpointError, match=r"config mismatch: .*mp_rank_01_000/model.safetensors tensor "
                                              r"vision.merger.linear_fc1.bias has shape \(3,\) .* implies \(128,\)"):
        load_mcore_state(tmp_path / "mc", 1, 2, 0, 1)
    cfg_path = tmp_path / "mc" / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config mismatch: .*tie_word_embeddings=True but .*tr1_mcore.json "
                                              "has num_layers=4, tied_embeddings=False"):
        load_mcore_state(tmp_path / "mc", 0, 2, 0, 1)
    cfg["text_config"]["num_hidden_layers"] = 2  # transformers' own validation fails: still one clear error
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"hf/config.json: not a valid Qwen2.5-VL config \(.*num_hidden_layers"):
        load_mcore_state(tmp_path / "mc", 0, 2, 0, 1)
