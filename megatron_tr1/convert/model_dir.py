"""What ``model.hf_dir`` / ``--model`` names (an HF Qwen2.5-VL folder or a tr1 checkpoint), checked before anything
is built.

``check_model_dir(path, key)`` looks at what ``model.hf_dir`` (or ``tr1 eval --model``; ``key`` is the name put in
messages) names, without building or loading anything large: an HF folder, or a tr1 Megatron checkpoint folder
(``tr1_mcore.json``, its config and tokenizer in ``hf/``), or that ``hf/`` folder itself. It checks that
``config.json`` is valid JSON of a Qwen2.5-VL model (``model_type: qwen2_5_vl``, read by ``models.family``, which
names a Qwen3-VL folder as recognised but not yet supported; sizes that are positive integers) and that the weights
are there (``*.safetensors`` or a ``model.safetensors.index.json`` whose files exist; for a tr1 checkpoint, every
rank file its ``tr1_mcore.json`` lists), and names a half-written folder (a staging folder
``*.tmp`` / ``step_N.tmp-*``, a training checkpoint without ``COMPLETE``, rank folders without ``tr1_mcore.json``)
as what it is. A folder of another model (GPT-2's config.json would otherwise load as a default-sized
Qwen2.5-VL, 8192 hidden x 80 layers) or one without weights fails here, in milliseconds, with one clear line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NoReturn

from megatron_tr1.errors import CheckpointError, ConfigError
from megatron_tr1.models.family import NAMES, family_of, hf_classes, require_supported

_STAGING = re.compile(r".+\.(tmp|old)(-.*)?")  # model.tmp (stage end), step_N.tmp-TAG / .old-PID (rl.checkpoint)
_STEP_DIR = re.compile(r"step_\d+")
_TEXT_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size")
_VISION_SIZES = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size",
                 "temporal_patch_size", "in_channels", "out_hidden_size")
_OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt")
_WHERE_FROM = ("point it at a Qwen2.5-VL or Qwen3-VL folder (e.g. downloaded Qwen/Qwen2.5-VL-3B-Instruct or "
               "Qwen/Qwen3-VL-8B-Instruct, or exported with tr1 convert mcore-to-hf) or a tr1 checkpoint folder "
               "(RUN/stages/<stage>/model)")


def _name(key: str, path) -> str:
    """``model.hf_dir='x'`` for a config key, ``--model 'x'`` for a command-line option."""
    return f"{key} {str(path)!r}" if key.startswith("-") else f"{key}={str(path)!r}"


def _command(key: str) -> str:
    """The command whose option or config key names the folder (``--model``: tr1 eval; ``model.hf_dir``: tr1 train)."""
    return {"model.hf_dir": "tr1 train", "--model": "tr1 eval"}.get(key, f"{key} (tr1 train / eval)")


def _last_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def check_model_dir(path: str | Path, key: str = "model.hf_dir") -> tuple[Path, Path]:
    """``(folder with config.json and the tokenizer, folder the weights load from)`` for ``path``, an HF folder or a
    tr1 Megatron checkpoint (or its ``hf/``), after checking config.json and the weights' presence. Raises
    ``ConfigError`` / ``CheckpointError`` naming ``key``, the value and what is wrong; builds and loads nothing."""
    from megatron_tr1.convert.checkpoint import HF_SUBDIR, META

    if not str(path).strip():
        raise ConfigError(f"{_name(key, path)}: the value is empty; {_WHERE_FROM}")
    path = Path(path)
    name = _name(key, path)
    if not path.exists():
        raise ConfigError(f"{name}: the folder does not exist; {_WHERE_FROM}")
    if not path.is_dir():
        raise ConfigError(f"{name}: not a folder; {_WHERE_FROM}")
    for folder in (path, path.parent):
        if _STAGING.fullmatch(folder.name):
            raise CheckpointError(f"{name}: {folder.name!r} is an incomplete checkpoint (the staging folder of a save "
                                  f"that was interrupted or is still running); point it at a finished one, e.g. "
                                  f"RUN/stages/<stage>/model or a step_N folder's model/")
    if (path / META).is_file():
        side, weights = path / HF_SUBDIR, path
    elif path.name == HF_SUBDIR and (path.parent / META).is_file():
        side, weights = path, path.parent  # a tr1 checkpoint's side folder: the weights are its rank folders
    elif (path / "config.json").is_file():
        side, weights = path, path
    else:
        _not_a_model_folder(path, name)
    _check_config_json(side / "config.json", name, key)
    if weights == side:
        _check_hf_weights(weights, name)
    else:
        _check_mcore_weights(weights, name)
    return side, weights


def _not_a_model_folder(path: Path, name: str) -> NoReturn:
    """Raise the error for a folder with neither config.json nor tr1_mcore.json, saying what it looks like."""
    from megatron_tr1.convert.checkpoint import META
    from megatron_tr1.convert.checkpoint import TRAIN_MARKER as MARKER, TRAIN_STATE as STATE_JSON

    if _STEP_DIR.fullmatch(path.name) or (path / STATE_JSON).is_file():  # a training checkpoint (rl.checkpoint)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"{name}: an incomplete checkpoint (no {MARKER} marker: its save was interrupted "
                                  f"or is still running); point it at a complete step_N folder's model/, or "
                                  f"RUN/stages/<stage>/model")
        raise ConfigError(f"{name}: a training checkpoint (trainer state, optimizer); its weights are the tr1 "
                          f"checkpoint {str(path / 'model')!r}: point it there")
    if any(path.glob("mp_rank_*")):
        raise CheckpointError(f"{name}: rank folders (mp_rank_*) but no {META}, which a save writes last: an "
                              f"incomplete tr1 checkpoint (interrupted save or conversion); save or convert it again")
    raise ConfigError(f"{name}: no config.json there; {_WHERE_FROM}")


def _check_config_json(cfg_path: Path, name: str, key: str) -> None:
    """config.json: a JSON object of a family tr1 runs (``models.family``: qwen2_5_vl, qwen3_vl; others named and
    refused) whose sizes are positive integers, that the family's transformers config class accepts."""
    if not cfg_path.is_file():
        raise CheckpointError(f"{name}: {cfg_path} is missing; the checkpoint is incomplete, save or convert it again")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: {cfg_path} is not UTF-8 text (byte {e.start}); restore the model's "
                          f"config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name}: {cfg_path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); restore the model's "
                          f"config.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: {cfg_path} must be a JSON object, got a {type(raw).__name__}")
    # the family, in one place (models/family.py): another model's folder, or Qwen3-VL, which only tr1 plan sizes
    family = require_supported(raw, f"{name}: {cfg_path}", _command(key), hint=_WHERE_FROM)
    text, vision = raw.get("text_config"), raw.get("vision_config")
    for section, value in (("text_config", text), ("vision_config", vision)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: {cfg_path}: {section} must be an object, got {value!r}")
    sizes = [(f"text_config.{k}" if isinstance(text, dict) and k in text else k,
              (text if isinstance(text, dict) and k in text else raw).get(k)) for k in _TEXT_SIZES]
    sizes += [(f"vision_config.{k}", (vision or {}).get(k)) for k in _VISION_SIZES]
    for field, value in sizes:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{name}: {cfg_path}: {field} must be a positive integer, got {value!r}")
    try:
        hf_classes(family)[0].from_dict(dict(raw))  # transformers' own checks (types, layer_types, ...)
    except Exception as e:
        raise ConfigError(f"{name}: {cfg_path} is not a valid {NAMES[family]} config ({_last_line(e)}); fix the "
                          f"field or re-export it with save_pretrained") from None


def _check_hf_weights(folder: Path, name: str) -> None:
    """``*.safetensors`` files, or an index whose files all exist."""
    from megatron_tr1.convert.storage import INDEX

    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{name}: {index} is not a safetensors index ({type(e).__name__}: {e}); download "
                                  f"it again") from None
        missing = [f for f in files if not (folder / str(f)).is_file()]
        if missing:
            raise CheckpointError(f"{name}: {folder / str(missing[0])} is missing ({len(missing)} of {len(files)} "
                                  f"files that {INDEX} lists); the download is incomplete, fetch the weights again")
        return
    if any(folder.glob("*.safetensors")):
        return
    other = sorted(p.name for pattern in _OTHER_WEIGHTS for p in folder.glob(pattern))
    if other:
        raise ConfigError(f"{name}: weights only as {', '.join(other[:3])}; tr1 reads safetensors: re-save the model "
                          f"with save_pretrained(..., safe_serialization=True)")
    raise ConfigError(f"{name}: no weights there (no *.safetensors, no {INDEX}); download the weights with the "
                      f"config, or {_WHERE_FROM}")


def _check_mcore_weights(ckpt: Path, name: str) -> None:
    """Every rank folder of the layout is listed in tr1_mcore.json and each listed file exists."""
    from megatron_tr1.convert.checkpoint import META, rank_dir, read_meta

    try:
        meta = read_meta(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    try:
        ranks = [rank_dir(t, p) for p in range(int(meta.pp)) for t in range(int(meta.tp))]
        listed = {str(rank): [str(f) for f in files] for rank, files in dict(meta.files).items()}
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{name}: {ckpt / META}: tp, pp or files is malformed; save or convert the checkpoint "
                              f"again") from None
    for rank in ranks:
        if not listed.get(rank):
            raise CheckpointError(f"{name}: {ckpt / META} lists no files for {rank}; the checkpoint is incomplete, "
                                  f"save or convert it again")
        for f in listed[rank]:
            if not (ckpt / rank / f).is_file():
                raise CheckpointError(f"{name}: {ckpt / rank / f} is missing (listed in {META}); the checkpoint is "
                                      f"incomplete, save or convert it again")


def load_hf_config_and_tokenizer(hf_dir: str | Path, key: str = "model.hf_dir"):
    """``(config, tokenizer)`` of an HF folder, a tr1 checkpoint folder or its ``hf/`` folder, after
    ``check_model_dir`` (errors name ``key``: ``model.hf_dir``, ``--model``); the config is the family's transformers
    class (``Qwen2_5_VLConfig``, ``Qwen3VLConfig``)."""
    from transformers import AutoTokenizer

    side, _ = check_model_dir(hf_dir, key)
    name = _name(key, hf_dir)
    family = family_of(side, f"{name}: {side / 'config.json'}")
    try:
        config = hf_classes(family)[0].from_pretrained(side)
    except Exception as e:
        raise ConfigError(f"{name}: {side / 'config.json'} is not a valid {NAMES[family]} config "
                          f"({_last_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(side)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name}: cannot load its tokenizer ({_last_line(e)})") from None
    return config, tokenizer
