"""The model family, read in one place (``models/family.py``). Qwen2.5-VL and Qwen3-VL (dense, issue 23) are both
supported; a Qwen3-VL-MoE folder (expert parallelism) or an unknown model_type given to ``tr1 train``, ``tr1 eval``,
``tr1 convert`` or ``tr1 verify`` is one clear error naming the folder and the model_type, before anything is built
or converted, not a Qwen2.5-VL read of the wrong config. The folders hold a config.json written by
``Qwen3VLConfig.save_pretrained`` (model_type rewritten for the refused families) and no weights."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from megatron_tr1.cli import main as tr1
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.family import family_of, require_supported
from megatron_tr1.models.qwen2_5_vl.size import Dims

MOE = r"model_type 'qwen3_vl_moe' is Qwen3-VL-MoE: its experts need expert parallelism .*which tr1 does not have"
UNKNOWN = r"model_type 'llava' is not a model family tr1 knows \('qwen2_5_vl' \(Qwen2\.5-VL\), 'qwen3_vl' \(Qwen3-VL\)\)"


def _tiny_qwen3() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, intermediate_size=64, vocab_size=128),
        vision_config=dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=24, out_hidden_size=32,
                           num_position_embeddings=4, deepstack_visual_indexes=[1]))


@pytest.fixture
def qwen3_dir(tmp_path) -> Path:
    folder = tmp_path / "qwen3"
    _tiny_qwen3().save_pretrained(folder)  # config.json only: the refusals come before weights are looked for
    return folder


def _retyped(qwen3_dir: Path, model_type: str) -> Path:
    folder = qwen3_dir.with_name(model_type)
    folder.mkdir()
    raw = json.loads((qwen3_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": model_type}))
    return folder


@pytest.fixture
def moe_dir(qwen3_dir) -> Path:
    return _retyped(qwen3_dir, "qwen3_vl_moe")


@pytest.fixture
def unknown_dir(qwen3_dir) -> Path:
    return _retyped(qwen3_dir, "llava")


@pytest.fixture(autouse=True)
def nothing_is_built(monkeypatch):
    import megatron_tr1.models.qwen2_5_vl as models
    import megatron_tr1.rollout.factory as factory

    def boom(*args, **kwargs):
        raise AssertionError("a model or an engine was built before the family was checked")

    monkeypatch.setattr(models, "Qwen2_5_VLModel", boom)
    monkeypatch.setattr(factory, "make_engine", boom)


def test_family_of_reads_model_type_from_a_dict_a_config_object_and_a_folder(qwen3_dir):
    assert family_of(qwen3_dir) == family_of(qwen3_dir / "config.json") == "qwen3_vl"
    assert family_of(_tiny_qwen3()) == family_of(_tiny_qwen3().to_dict()) == "qwen3_vl"
    assert family_of(Qwen2_5_VLConfig()) == family_of({"model_type": "qwen2_5_vl"}) == "qwen2_5_vl"
    assert family_of({"hidden_size": 8}, default="qwen2_5_vl") == "qwen2_5_vl"
    with pytest.raises(ConfigError, match=r"^x\.json has no model_type"):
        family_of({"hidden_size": 8}, "x.json")
    with pytest.raises(ConfigError, match=r"^x\.json: model_type \['a'\] is not a model family tr1 knows"):
        family_of({"model_type": ["a"]}, "x.json")
    with pytest.raises(ConfigError, match=r"model_type 'qwen3_vl_moe' is Qwen3-VL-MoE: .*expert parallelism"):
        family_of({"model_type": "qwen3_vl_moe"})
    assert require_supported({"model_type": "qwen2_5_vl"}, "x", "tr1 train") == "qwen2_5_vl"
    assert require_supported(qwen3_dir, "x", "tr1 train") == "qwen3_vl"  # issue 23: Qwen3-VL dense runs


@pytest.mark.parametrize("kind", ["moe", "unknown"])
def test_train_refuses_a_moe_or_unknown_folder_naming_it(kind, moe_dir, unknown_dir, tmp_path):
    from megatron_tr1.rl.config import load_train_config
    from megatron_tr1.rl.train_cli import prepare_model

    folder, reason = (moe_dir, MOE) if kind == "moe" else (unknown_dir, UNKNOWN)
    cfg = load_train_config(None, [f"model.hf_dir={folder}"])
    with pytest.raises(ConfigError, match=rf"^model\.hf_dir=.*{folder.name}.*config\.json: " + reason) as e:
        prepare_model(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)


def test_eval_refuses_a_moe_folder_naming_it(moe_dir):
    from megatron_tr1.data.video import VideoBudget
    from megatron_tr1.eval.model_predictor import load_model_predictor

    with pytest.raises(ConfigError, match=r"^--model .*qwen3_vl_moe.*" + MOE):
        load_model_predictor(moe_dir, "hf", VideoBudget(), think=True, max_tokens=8)


@pytest.mark.parametrize("kind", ["moe", "unknown"])
def test_convert_refuses_a_moe_or_unknown_folder_naming_it(kind, moe_dir, unknown_dir, tmp_path, capsys):
    folder, reason = (moe_dir, MOE) if kind == "moe" else (unknown_dir, UNKNOWN)
    out = tmp_path / "mcore"
    assert tr1(["convert", "hf-to-mcore", "--hf-dir", str(folder), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder / "config.json") in err
    assert re.search(reason, err)
    assert not out.exists()


def test_mcore_to_hf_refuses_a_checkpoint_whose_config_is_moe(moe_dir, tmp_path, capsys):
    ckpt = tmp_path / "mcore"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "config.json").write_text((moe_dir / "config.json").read_text())
    meta = {"format": "tr1_mcore", "version": 1, "tp": 1, "pp": 1, "spec": "local", "num_layers": 2,
            "dtype": "float32", "tied_embeddings": False, "files": {"mp_rank_00_000": ["model.safetensors"]}}
    (ckpt / "tr1_mcore.json").write_text(json.dumps(meta))
    assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(MOE, err)
    assert not (tmp_path / "hf").exists()


def test_verify_refuses_a_moe_hf_dir_naming_it(moe_dir, tmp_path, capsys):
    assert tr1(["verify", "--hf-dir", str(moe_dir), "--mcore-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--hf-dir {moe_dir}" in err
    assert re.search(MOE, err)


def test_dims_read_a_qwen3_config_and_refuse_moe_and_unknown_types(qwen3_dir, moe_dir, unknown_dir):
    d = Dims.from_hf_config(_tiny_qwen3())
    assert (d.family, d.hidden, d.head_dim, d.qk_norm, d.deepstack, d.v_pos_embed) == ("qwen3_vl", 32, 16, True, 1, 4)
    assert Dims.from_hf_config(json.loads((qwen3_dir / "config.json").read_text()), "cfg.json") == \
        Dims.from_hf_config(_tiny_qwen3(), "cfg.json")
    for folder, reason in ((moe_dir, MOE), (unknown_dir, UNKNOWN)):
        with pytest.raises(ConfigError, match=r"^cfg\.json: " + reason):
            Dims.from_hf_config(json.loads((folder / "config.json").read_text()), "cfg.json",
                                command="tr1 convert hf-to-mcore")
    flat = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64, "vocab_size": 128, "vision_config": {"out_hidden_size": 32}}
    assert Dims.from_hf_config(flat).hidden == 32  # no model_type: the older flat Qwen2.5-VL layout, as before
