"""``model.hf_dir`` / ``tr1 eval --model`` faults: a folder of another model, one without weights, a broken
config.json, a half-written checkpoint. Each must be a one-line ConfigError/CheckpointError before any model is
built (a default-sized Qwen2.5-VL is 8192 x 80 layers: building one exhausts the machine)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_tr1.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from megatron_tr1.demo import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(autouse=True)
def nothing_is_built(monkeypatch):
    """Building a model or an engine fails the test (and keeps a pre-fix run from building an 80-layer model)."""
    import megatron_tr1.models.qwen2_5_vl as models
    import megatron_tr1.rollout.factory as factory
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model was built before the model folder was checked")

    monkeypatch.setattr(models, "Qwen2_5_VLModel", boom)
    monkeypatch.setattr(factory, "make_engine", boom)
    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "__init__", boom)


def _folder(root: Path, tokenizer_dir: Path, config, weights: bool = True) -> Path:
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, root / f.name)
    (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(root / "model.safetensors"))
    return root


def _qwen_config(**changes) -> dict:
    from megatron_tr1.demo import tiny_hf_config

    config = tiny_hf_config().to_dict()
    config.update(changes)
    return config


def _prepare(hf_dir, tmp_path):
    from megatron_tr1.rl.config import load_train_config
    from megatron_tr1.rl.train_cli import prepare_model

    cfg = load_train_config(None, [f"model.hf_dir={hf_dir}"])
    return prepare_model(cfg, tmp_path / "run")


def _predictor(model_dir):
    from megatron_tr1.data.video import VideoBudget
    from megatron_tr1.eval.model_predictor import load_model_predictor

    return load_model_predictor(model_dir, "hf", VideoBudget(), think=True, max_tokens=8)


# ---------------------------------------------------------------- 2: another model, or no weights
def test_gpt2_folder_is_refused_before_building(tmp_path, tokenizer_dir):
    gpt2 = _folder(tmp_path / "gpt2", tokenizer_dir, {"model_type": "gpt2", "n_embd": 768, "n_layer": 12})
    with pytest.raises(ConfigError, match=r"model\.hf_dir=.*gpt2.*model_type 'gpt2'.*qwen2_5_vl"):
        _prepare(gpt2, tmp_path)
    with pytest.raises(ConfigError, match=r"^--model .*model_type 'gpt2'.*qwen2_5_vl"):
        _predictor(gpt2)


def test_real_size_folder_without_weights_fails_fast(tmp_path, tokenizer_dir):
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig().to_dict()  # the default sizes: hidden 8192, 80 layers
    assert config["text_config"]["num_hidden_layers"] == 80
    folder = _folder(tmp_path / "big", tokenizer_dir, config, weights=False)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"model\.hf_dir=.*big.*no weights"):
        _prepare(folder, tmp_path)
    with pytest.raises(ConfigError, match=r"^--model .*big.*no weights"):
        _predictor(folder)
    assert time.monotonic() - start < 30


def test_index_naming_missing_shards(tmp_path, tokenizer_dir):
    folder = _folder(tmp_path / "sharded", tokenizer_dir, _qwen_config(), weights=False)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"model-00001-of-00002\.safetensors.*missing"):
        _prepare(folder, tmp_path)


def test_good_hf_folder_passes(tmp_path, tokenizer_dir):
    folder = _folder(tmp_path / "ok", tokenizer_dir, _qwen_config())
    assert _prepare(folder, tmp_path) == (folder, folder)


# ---------------------------------------------------------------- 2: invalid config.json
@pytest.mark.parametrize("config, message", [
    ("{not json", r"config\.json.*not valid JSON"),
    ("[1, 2]", r"config\.json.*must be a JSON object"),
    (json.dumps({"model_type": 7}), r"model_type 7"),
    (json.dumps({"n_embd": 768}), r"has no model_type"),
    (json.dumps(_qwen_config(text_config={"hidden_size": "big"})), r"config\.json.*hidden_size"),
    (json.dumps(_qwen_config(vision_config=3)), r"config\.json.*vision_config"),
], ids=["not-json", "list", "model-type-int", "no-model-type", "hidden-size-str", "vision-config-int"])
def test_invalid_config_json_is_one_clear_error(tmp_path, tokenizer_dir, config, message):
    folder = _folder(tmp_path / "bad", tokenizer_dir, config)
    with pytest.raises(ConfigError, match=message) as e:
        _prepare(folder, tmp_path)
    assert "\n" not in str(e.value) and str(e.value).startswith("model.hf_dir=")


# ---------------------------------------------------------------- 2: tr1 Megatron checkpoints
def _mcore(root: Path, tokenizer_dir: Path, shard: bool = True) -> Path:
    _folder(root / "hf", tokenizer_dir, _qwen_config(), weights=False)  # the side folder has no weights
    meta = {"format": "tr1_mcore", "version": 1, "tp": 1, "pp": 1, "spec": "local", "num_layers": 4,
            "dtype": "float32", "tied_embeddings": False, "files": {"mp_rank_00_000": ["model.safetensors"]}}
    (root / "tr1_mcore.json").write_text(json.dumps(meta))
    if shard:
        from safetensors.torch import save_file

        (root / "mp_rank_00_000").mkdir()
        save_file({"w": torch.zeros(2)}, str(root / "mp_rank_00_000" / "model.safetensors"))
    return root


def test_tr1_checkpoint_weights_are_its_rank_files(tmp_path, tokenizer_dir):
    ckpt = _mcore(tmp_path / "model", tokenizer_dir)
    assert _prepare(ckpt, tmp_path) == (ckpt / "hf", ckpt)
    from megatron_tr1.convert.model_dir import load_hf_config_and_tokenizer

    load_hf_config_and_tokenizer(ckpt / "hf")  # what the trainer loads: the side folder, weights beside it


def test_tr1_checkpoint_missing_a_rank_file(tmp_path, tokenizer_dir):
    ckpt = _mcore(tmp_path / "model", tokenizer_dir, shard=False)
    with pytest.raises(UserError, match=r"mp_rank_00_000/model\.safetensors.*missing"):
        _prepare(ckpt, tmp_path)


def test_tr1_checkpoint_of_another_model_is_refused_before_converting(tmp_path, tokenizer_dir, monkeypatch):
    import megatron_tr1.convert.mcore_to_hf as mcore_to_hf

    ckpt = _mcore(tmp_path / "model", tokenizer_dir)
    (ckpt / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    monkeypatch.setattr(mcore_to_hf, "convert_mcore_to_hf", lambda *a, **k: pytest.fail("converted first"))
    with pytest.raises(ConfigError, match=r"^--model .*model_type 'gpt2'"):
        _predictor(ckpt)


# ---------------------------------------------------------------- 10: names and half-written folders
def test_eval_errors_name_the_model_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^--model '.*nothing': .*does not exist") as e:
        _predictor(tmp_path / "nothing")
    assert "model.hf_dir" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^--model '.*empty': no config\.json"):
        _predictor(tmp_path / "empty")


@pytest.mark.parametrize("name", ["step_000020.tmp-1234", "model.tmp"])
def test_staging_folder_is_called_incomplete(tmp_path, tokenizer_dir, name):
    staging = tmp_path / name
    (staging / "model" / "mp_rank_00_000").mkdir(parents=True)
    (staging / "mp_rank_00_000").mkdir()
    for check in (lambda: _prepare(staging, tmp_path), lambda: _predictor(staging)):
        with pytest.raises(UserError, match=r"incomplete|staging") as e:
            check()
        assert "no config.json" not in str(e.value)


def test_training_checkpoint_without_complete_marker(tmp_path, tokenizer_dir):
    step = tmp_path / "checkpoints" / "grpo" / "step_000020"
    _mcore(step / "model", tokenizer_dir)
    (step / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match=r"incomplete checkpoint.*COMPLETE") as e:
        _prepare(step, tmp_path)
    assert "no config.json" not in str(e.value)
    (step / "COMPLETE").write_text("step 20\n")  # a complete one: point at its model/ folder
    with pytest.raises(ConfigError, match=r"training checkpoint.*step_000020/model"):
        _prepare(step, tmp_path)
