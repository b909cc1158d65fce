"""The model family, read in one place (``models/family.py``): a Qwen3-VL folder given to ``tr1 train``, ``tr1 eval``,
``tr1 convert`` or ``tr1 verify`` is one clear error saying Qwen3-VL is recognised but not yet supported by that
command (issue 23), before anything is built or converted, not a "not qwen2_5_vl" message or a Qwen2.5-VL read of
the wrong config. The folders hold a config.json written by ``Qwen3VLConfig.save_pretrained`` and no weights."""
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

REFUSAL = r"model_type 'qwen3_vl' is Qwen3-VL, which tr1 recognises but {} does not support yet: .*issue 23"


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


def test_train_refuses_a_qwen3_folder_naming_it(qwen3_dir, tmp_path):
    from megatron_tr1.rl.config import load_train_config
    from megatron_tr1.rl.train_cli import prepare_model

    cfg = load_train_config(None, [f"model.hf_dir={qwen3_dir}"])
    with pytest.raises(ConfigError, match=r"^model\.hf_dir=.*qwen3.*config\.json: " + REFUSAL.format("tr1 train")) as e:
        prepare_model(cfg, tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message and "not Qwen2.5-VL" not in message
    assert all(w in message for w in ("interleaved M-RoPE", "DeepStack", "QK-norm", "tr1 plan --model"))


def test_eval_refuses_a_qwen3_folder_naming_it(qwen3_dir):
    from megatron_tr1.data.video import VideoBudget
    from megatron_tr1.eval.model_predictor import load_model_predictor

    with pytest.raises(ConfigError, match=r"^--model .*qwen3.*" + REFUSAL.format("tr1 eval")):
        load_model_predictor(qwen3_dir, "hf", VideoBudget(), think=True, max_tokens=8)


def test_convert_refuses_a_qwen3_folder_naming_it(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "mcore"
    assert tr1(["convert", "hf-to-mcore", "--hf-dir", str(qwen3_dir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(qwen3_dir / "config.json") in err
    assert re.search(REFUSAL.format("tr1 convert hf-to-mcore"), err)
    assert not out.exists()


def test_mcore_to_hf_refuses_a_checkpoint_whose_config_is_qwen3(qwen3_dir, tmp_path, capsys):
    ckpt = tmp_path / "mcore"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "config.json").write_text((qwen3_dir / "config.json").read_text())
    meta = {"format": "tr1_mcore", "version": 1, "tp": 1, "pp": 1, "spec": "local", "num_layers": 2,
            "dtype": "float32", "tied_embeddings": False, "files": {"mp_rank_00_000": ["model.safetensors"]}}
    (ckpt / "tr1_mcore.json").write_text(json.dumps(meta))
    assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(REFUSAL.format("tr1 convert mcore-to-hf"), err)
    assert not (tmp_path / "hf").exists()


def test_verify_refuses_a_qwen3_hf_dir_naming_it(qwen3_dir, tmp_path, capsys):
    assert tr1(["verify", "--hf-dir", str(qwen3_dir), "--mcore-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--hf-dir {qwen3_dir}" in err
    assert re.search(REFUSAL.format("tr1 verify"), err)


def test_dims_refuse_a_qwen3_config_instead_of_reading_it_as_qwen2_5(qwen3_dir):
    with pytest.raises(ConfigError, match=REFUSAL.format("tr1 train / eval / convert / verify")):
        Dims.from_hf_config(_tiny_qwen3())
    with pytest.raises(ConfigError, match=r"^cfg\.json: " + REFUSAL.format("tr1 convert hf-to-mcore")):
        Dims.from_hf_config(json.loads((qwen3_dir / "config.json").read_text()), "cfg.json",
                            command="tr1 convert hf-to-mcore")
    flat = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64, "vocab_size": 128, "vision_config": {"out_hidden_size": 32}}
    assert Dims.from_hf_config(flat).hidden == 32  # no model_type: the older flat Qwen2.5-VL layout, as before
