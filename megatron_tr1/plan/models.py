"""The Qwen2.5-VL shape numbers the planner needs: the built-in 3B / 7B / 72B configs and ``config.json`` loading.

Built-in values are the released Hugging Face configs of the bf16 checkpoints:
- 3B:  https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json: hidden 2048, 36 layers, 16 heads,
  2 kv heads, intermediate 11008, vocab 151936, tie_word_embeddings true, vision out_hidden 2048.
- 7B:  https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json: hidden 3584, 28 layers, 28 heads,
  4 kv heads, intermediate 18944, vocab 152064, untied; vision_config depth 32, hidden 1280, intermediate 3420,
  num_heads 16, patch 14, temporal patch 2, spatial_merge 2, out_hidden 3584 (the same tower in all three sizes).
- 72B: https://huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct/blob/main/config.json: hidden 8192, 80 layers, 64 heads,
  8 kv heads, intermediate 29568 (as Qwen2.5-72B), vocab 152064, untied. The -AWQ repack's config shows 29696 and
  vision 3456: zero padding for int4 group size 128 (QwenLM/Qwen2-VL issues #230, #231), not the bf16 shapes.
The 7B and 72B vocabularies are 152064, not the 3B's 151936. ``total_params`` gives exactly the published totals,
3.75B / 8.29B / 73.4B; the tests also check it against the real ``transformers`` modules built on the meta device.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_tr1.errors import ConfigError


@dataclass(frozen=True)
class TextSpec:
    """The language model (a Qwen2.5 decoder: GQA attention with QKV bias, SwiGLU MLP, RMSNorm)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: a ViT with biased linears and a SwiGLU MLP, then a 2x2 patch-merger MLP into the LM."""

    depth: int = 32
    hidden: int = 1280
    heads: int = 16
    ffn: int = 3420
    out_hidden: int = 2048
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2
    in_channels: int = 3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    text: TextSpec
    vision: VisionSpec


def _builtin(name: str, hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, tied: bool) -> ModelSpec:
    return ModelSpec(name, TextSpec(hidden, layers, heads, kv, ffn, vocab, tied), VisionSpec(out_hidden=hidden))


BUILTIN: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _builtin("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True),
        _builtin("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False),
        _builtin("qwen2.5-vl-72b", 8192, 80, 64, 8, 29568, 152064, False),
    )
}

_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")
# transformers' Qwen2_5_VLVisionConfig defaults, used for keys a checkpoint's vision_config leaves out.
_VISION_DEFAULTS = {"depth": 32, "hidden_size": 3584, "num_heads": 16, "intermediate_size": 3420,
                    "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}


def load_model(model: str) -> ModelSpec:
    """A built-in name, or an HF checkpoint directory holding a Qwen2.5-VL ``config.json``."""
    if model in BUILTIN:
        return BUILTIN[model]
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {model!r} is neither a known model ({', '.join(BUILTIN)}) "
                          "nor an HF checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--model {model!r}: {cfg_file} not found; point --model at an HF Qwen2.5-VL checkpoint "
                          "directory (the one holding config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot read it as JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    return spec_from_hf_config(raw, name=str(path), source=str(cfg_file))


def spec_from_hf_config(raw: dict, name: str, source: str) -> ModelSpec:
    """Read both layouts: transformers 5 (``text_config`` + ``vision_config``) and the older flat one."""
    model_type = raw.get("model_type", "qwen2_5_vl")
    if model_type != "qwen2_5_vl":
        raise ConfigError(f"{source}: model_type {model_type!r} is not 'qwen2_5_vl'; the planner knows Qwen2.5-VL only")
    text = raw.get("text_config") or raw
    vis = raw.get("vision_config") or {}
    for section, value in (("text_config", text), ("vision_config", vis)):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {section} is a {type(value).__name__}; expected a JSON object")
    t = {k: _positive_int(text, k, source, "text") for k in _TEXT_KEYS}
    tied = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    vis = {**vis, "in_channels": vis.get("in_channels", vis.get("in_chans", _VISION_DEFAULTS["in_channels"]))}
    v = {k: _positive_int({**_VISION_DEFAULTS, **vis}, k, source, "vision_config") for k in _VISION_DEFAULTS}
    out_hidden = _positive_int({"out_hidden_size": 3584, **vis}, "out_hidden_size", source, "vision_config")
    if t["hidden_size"] % t["num_attention_heads"] or t["num_attention_heads"] % t["num_key_value_heads"]:
        raise ConfigError(f"{source}: hidden_size {t['hidden_size']}, num_attention_heads {t['num_attention_heads']}, "
                          f"num_key_value_heads {t['num_key_value_heads']} must divide one another in that order")
    if v["hidden_size"] % v["num_heads"]:
        raise ConfigError(f"{source}: vision_config.hidden_size {v['hidden_size']} is not divisible by "
                          f"num_heads {v['num_heads']}")
    if out_hidden != t["hidden_size"]:
        raise ConfigError(f"{source}: vision_config.out_hidden_size {out_hidden} must equal the language "
                          f"hidden_size {t['hidden_size']} (the merger feeds the LM)")
    return ModelSpec(
        name,
        TextSpec(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
                 t["intermediate_size"], t["vocab_size"], tied),
        VisionSpec(v["depth"], v["hidden_size"], v["num_heads"], v["intermediate_size"], out_hidden,
                   v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"], v["in_channels"]),
    )


def _positive_int(cfg: dict, key: str, source: str, section: str) -> int:
    if key not in cfg:
        raise ConfigError(f"{source}: {section} has no {key!r}; is this a Qwen2.5-VL config.json?")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {section}.{key} = {value!r}; expected a positive integer")
    return value
