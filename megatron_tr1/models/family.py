"""Which model family an HF config is: read from its ``model_type`` here and nowhere else.

``family_of(config, source)`` takes a config.json dict, a transformers config object or a model folder (or its
config.json) and returns ``"qwen2_5_vl"`` (Qwen2.5-VL) or ``"qwen3_vl"`` (Qwen3-VL dense); any other model_type is
a ``ConfigError`` naming ``source`` and the value (Qwen3-VL-MoE gets its own reason: expert parallelism).
``require_supported(config, source, command)`` also refuses a family that ``command`` cannot run yet (``SUPPORTED``;
since issue 23 both families: the Megatron model ``models.qwen3_vl`` and the conversion table cover Qwen3-VL dense).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_tr1.errors import ConfigError

QWEN2_5_VL, QWEN3_VL = "qwen2_5_vl", "qwen3_vl"
NAMES = {QWEN2_5_VL: "Qwen2.5-VL", QWEN3_VL: "Qwen3-VL"}  # model_type -> family name
SUPPORTED = (QWEN2_5_VL, QWEN3_VL)  # what tr1 train / eval / convert / verify run; tr1 plan sizes every family
_MOE = {"qwen3_vl_moe": "Qwen3-VL-MoE: its experts need expert parallelism (megatron-core's MoE layers, expert-"
                        "parallel groups, the experts' rows in the conversion table and vLLM's expert sharding), which "
                        "tr1 does not have yet (future work; dense Qwen3-VL, model_type 'qwen3_vl', runs)"}
_KNOWN = ", ".join(f"{t!r} ({n})" for t, n in NAMES.items())


def _config_json(path: Path, source: str) -> dict:
    cfg = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{source}: cannot read {cfg} as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {cfg} must be a JSON object, got a {type(raw).__name__}")
    return raw


def family_of(config: Any, source: str = "config.json", default: str | None = None, hint: str = "") -> str:
    """``"qwen2_5_vl"`` or ``"qwen3_vl"`` from ``config``'s ``model_type`` (a config.json dict, a transformers config,
    or a folder / config.json path). ``default`` is used when the dict has no model_type (None: that is an error);
    ``hint`` ends every error message (where to get a good folder)."""
    if isinstance(config, (str, Path)):
        config = _config_json(Path(config), source)
    model_type = config.get("model_type", default) if isinstance(config, Mapping) else getattr(
        config, "model_type", default)
    tail = f"; {hint}" if hint else ""
    if model_type is None:
        raise ConfigError(f"{source} has no model_type; a Qwen2.5-VL config.json has \"model_type\": "
                          f"\"{QWEN2_5_VL}\" (Qwen3-VL: \"{QWEN3_VL}\"){tail}")
    if isinstance(model_type, str) and model_type in NAMES:
        return model_type
    if isinstance(model_type, str) and model_type in _MOE:
        raise ConfigError(f"{source}: model_type {model_type!r} is {_MOE[model_type]}{tail}")
    raise ConfigError(f"{source}: model_type {model_type!r} is not a model family tr1 knows ({_KNOWN}){tail}")


def unsupported_message(family: str, source: str, command: str) -> str:
    """Why ``command`` refuses a recognised family it cannot run (a family in ``NAMES`` but not in ``SUPPORTED``)."""
    return (f"{source}: model_type {family!r} is {NAMES[family]}, which tr1 recognises but {command} does not "
            f"support yet; today only `tr1 plan --model <folder>` sizes it")


def hf_classes(family: str):
    """transformers' ``(config class, model class)`` of a family (``Qwen2_5_VLConfig``,
    ``Qwen2_5_VLForConditionalGeneration`` / the Qwen3-VL pair)."""
    import transformers

    prefix = {QWEN2_5_VL: "Qwen2_5_VL", QWEN3_VL: "Qwen3VL"}[family]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForConditionalGeneration")


def require_supported(config: Any, source: str, command: str, hint: str = "", default: str | None = None) -> str:
    """``family_of(config)``, after refusing a family ``command`` (e.g. ``"tr1 convert hf-to-mcore"``) cannot run."""
    family = family_of(config, source, default, hint)
    if family not in SUPPORTED:
        raise ConfigError(unsupported_message(family, source, command))
    return family
