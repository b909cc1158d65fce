"""The shape numbers the planner needs: the built-in Qwen2.5-VL 3B / 7B / 72B and Qwen3-VL 2B / 4B / 8B configs and
``config.json`` loading (the family from ``model_type``, read by ``models.family``).

Qwen2.5-VL built-in values are the released Hugging Face configs of the bf16 checkpoints:
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

Qwen3-VL (dense) built-ins, from the released configs (every text_config has head_dim 128, no attention bias,
rope_theta 5e6 with interleaved M-RoPE sections [24, 20, 20], vocab 151936; every vision_config has patch 16,
temporal patch 2, spatial_merge 2, 2304 learned position embeddings, GELU MLP, LayerNorm):
- 2B: https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct/blob/main/config.json: hidden 2048, 28 layers, 16 heads,
  8 kv heads, intermediate 6144, tie_word_embeddings true; vision depth 24, hidden 1024, intermediate 4096,
  16 heads, out_hidden 2048, deepstack_visual_indexes [5, 11, 17].
- 4B: https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json: hidden 2560 (head_dim 128, so the
  32 query heads are 4096 wide), 36 layers, 32 heads, 8 kv heads, intermediate 9728, tied; the 2B's vision tower
  with out_hidden 2560.
- 8B: https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json: hidden 4096, 36 layers, 32 heads,
  8 kv heads, intermediate 12288, untied; vision depth 27, hidden 1152, intermediate 4304, 16 heads, out_hidden 4096,
  deepstack_visual_indexes [8, 16, 24].
The language models are Qwen3-1.7B / 4B / 8B's shapes. ``total_params`` of these is tested against
``Qwen3VLForConditionalGeneration`` built on the meta device from the same numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.family import QWEN2_5_VL, QWEN3_VL, family_of


@dataclass(frozen=True)
class TextSpec:
    """The language model: GQA attention, SwiGLU MLP, RMSNorm. Qwen2.5: QKV bias, head_dim = hidden / heads;
    Qwen3: no QKV bias, RMSNorm on each q and k head (QK-norm), head_dim from the config (``kv_channels``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    kv_channels: int = 0  # head_dim; 0: hidden // heads
    qkv_bias: bool = True
    o_bias: bool = False  # Qwen3's attention_bias also biases o_proj
    qk_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        """Query (and attention output) width, heads x head_dim: the hidden size unless head_dim is set apart."""
        return self.heads * self.head_dim


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: a ViT with biased linears, then a 2x2 patch-merger MLP into the LM. Qwen2.5-VL: SwiGLU MLP,
    RMSNorm, no patch bias. Qwen3-VL: GELU MLP, LayerNorm, a biased patch embedding, ``pos_embeddings`` learned
    positions, and a DeepStack merger (LayerNorm over the merged width, fc1, fc2) per ``deepstack`` layer index."""

    depth: int = 32
    hidden: int = 1280
    heads: int = 16
    ffn: int = 3420
    out_hidden: int = 2048
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2
    in_channels: int = 3
    gated: bool = True  # SwiGLU (gate, up, down) or a GELU MLP (fc1, fc2)
    layer_norm: bool = False  # LayerNorm (weight and bias) or RMSNorm (weight)
    patch_bias: bool = False
    pos_embeddings: int = 0
    deepstack: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    text: TextSpec
    vision: VisionSpec
    family: str = QWEN2_5_VL


def _builtin(name: str, hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, tied: bool) -> ModelSpec:
    return ModelSpec(name, TextSpec(hidden, layers, heads, kv, ffn, vocab, tied), VisionSpec(out_hidden=hidden))


_QWEN3_VISION = dict(gated=False, layer_norm=True, patch_bias=True, pos_embeddings=2304)


def _qwen3_vl(name: str, hidden: int, layers: int, heads: int, ffn: int, tied: bool, v_depth: int, v_hidden: int,
              v_ffn: int, deepstack: tuple[int, ...]) -> ModelSpec:
    text = TextSpec(hidden, layers, heads, 8, ffn, 151936, tied, kv_channels=128, qkv_bias=False, qk_norm=True)
    vision = VisionSpec(v_depth, v_hidden, 16, v_ffn, hidden, patch=16, **_QWEN3_VISION, deepstack=deepstack)
    return ModelSpec(name, text, vision, QWEN3_VL)


BUILTIN: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _builtin("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True),
        _builtin("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False),
        _builtin("qwen2.5-vl-72b", 8192, 80, 64, 8, 29568, 152064, False),
        _qwen3_vl("qwen3-vl-2b", 2048, 28, 16, 6144, True, 24, 1024, 4096, (5, 11, 17)),
        _qwen3_vl("qwen3-vl-4b", 2560, 36, 32, 9728, True, 24, 1024, 4096, (5, 11, 17)),
        _qwen3_vl("qwen3-vl-8b", 4096, 36, 32, 12288, False, 27, 1152, 4304, (8, 16, 24)),
    )
}

_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")
# transformers' Qwen2_5_VLVisionConfig defaults, used for keys a checkpoint's vision_config leaves out.
_VISION_DEFAULTS = {"depth": 32, "hidden_size": 3584, "num_heads": 16, "intermediate_size": 3420,
                    "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
# transformers 5.19's Qwen3VLVisionConfig defaults (configuration_qwen3_vl.py), for keys a vision_config leaves out.
_QWEN3_VISION_DEFAULTS = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                          "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                          "out_hidden_size": 3584, "num_position_embeddings": 2304}
_QWEN3_DEEPSTACK_DEFAULT = [8, 16, 24]
_QWEN3_HEAD_DIM_DEFAULT = 128  # Qwen3VLTextConfig.head_dim


def load_model(model: str) -> ModelSpec:
    """A built-in name, or an HF checkpoint directory holding a Qwen2.5-VL or Qwen3-VL ``config.json``."""
    if model in BUILTIN:
        return BUILTIN[model]
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {model!r} is neither a known model ({', '.join(BUILTIN)}) "
                          "nor an HF checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--model {model!r}: {cfg_file} not found; point --model at an HF Qwen2.5-VL or Qwen3-VL "
                          "checkpoint directory (the one holding config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot read it as JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    return spec_from_hf_config(raw, name=str(path), source=str(cfg_file))


def spec_from_hf_config(raw: dict, name: str, source: str) -> ModelSpec:
    """The family from ``model_type`` (none: Qwen2.5-VL's older flat layout), then that family's sizes."""
    family = family_of(raw, source, default=QWEN2_5_VL)
    return (_qwen3_vl_spec if family == QWEN3_VL else _qwen2_5_vl_spec)(raw, name, source)


def _sections(raw: dict, source: str, flat: bool) -> tuple[dict, dict]:
    """``(text_config, vision_config)``; ``flat``: the text keys may sit at the top level (Qwen2.5-VL's old layout)."""
    text = raw.get("text_config") or (raw if flat else None)
    if text is None:
        raise ConfigError(f"{source}: no text_config; a Qwen3-VL config.json holds text_config and vision_config")
    vis = raw.get("vision_config") or {}
    for section, value in (("text_config", text), ("vision_config", vis)):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {section} is a {type(value).__name__}; expected a JSON object")
    return text, vis


def _check_shapes(source: str, t: dict, v: dict, out_hidden: int, head_dim_set: bool) -> None:
    heads, kv = t["num_attention_heads"], t["num_key_value_heads"]
    if (not head_dim_set and t["hidden_size"] % heads) or heads % kv:
        raise ConfigError(f"{source}: hidden_size {t['hidden_size']}, num_attention_heads {heads}, "
                          f"num_key_value_heads {kv} must divide one another in that order")
    if v["hidden_size"] % v["num_heads"]:
        raise ConfigError(f"{source}: vision_config.hidden_size {v['hidden_size']} is not divisible by "
                          f"num_heads {v['num_heads']}")
    if out_hidden != t["hidden_size"]:
        raise ConfigError(f"{source}: vision_config.out_hidden_size {out_hidden} must equal the language "
                          f"hidden_size {t['hidden_size']} (the merger feeds the LM)")


def _qwen2_5_vl_spec(raw: dict, name: str, source: str) -> ModelSpec:
    """Both layouts: transformers 5 (``text_config`` + ``vision_config``) and the older flat one."""
    text, vis = _sections(raw, source, flat=True)
    t = {k: _positive_int(text, k, source, "text") for k in _TEXT_KEYS}
    tied = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    vis = {**vis, "in_channels": vis.get("in_channels", vis.get("in_chans", _VISION_DEFAULTS["in_channels"]))}
    v = {k: _positive_int({**_VISION_DEFAULTS, **vis}, k, source, "vision_config") for k in _VISION_DEFAULTS}
    out_hidden = _positive_int({"out_hidden_size": 3584, **vis}, "out_hidden_size", source, "vision_config")
    _check_shapes(source, t, v, out_hidden, head_dim_set=False)
    return ModelSpec(
        name,
        TextSpec(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
                 t["intermediate_size"], t["vocab_size"], tied),
        VisionSpec(v["depth"], v["hidden_size"], v["num_heads"], v["intermediate_size"], out_hidden,
                   v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"], v["in_channels"]),
    )


def _qwen3_vl_spec(raw: dict, name: str, source: str) -> ModelSpec:
    """Qwen3-VL: ``text_config`` (head_dim, attention_bias) + ``vision_config`` (learned positions, DeepStack).
    Tied embeddings follow the top-level ``tie_word_embeddings`` only, as transformers 5.19 ties them."""
    text, vis = _sections(raw, source, flat=False)
    t = {k: _positive_int(text, k, source, "text_config") for k in _TEXT_KEYS}
    head_dim = _positive_int({"head_dim": _QWEN3_HEAD_DIM_DEFAULT, **text}, "head_dim", source, "text_config")
    bias = text.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise ConfigError(f"{source}: text_config.attention_bias = {bias!r}; expected true or false")
    v = {k: _positive_int({**_QWEN3_VISION_DEFAULTS, **vis}, k, source, "vision_config")
         for k in _QWEN3_VISION_DEFAULTS}
    _check_shapes(source, t, v, v["out_hidden_size"], head_dim_set=True)
    deepstack = vis.get("deepstack_visual_indexes", _QWEN3_DEEPSTACK_DEFAULT)
    if not _layer_indexes(deepstack, v["depth"]):
        raise ConfigError(f"{source}: vision_config.deepstack_visual_indexes = {deepstack!r}; expected distinct "
                          f"vision layer indexes in [0, depth {v['depth']})")
    if len(deepstack) > t["num_hidden_layers"]:
        raise ConfigError(f"{source}: vision_config.deepstack_visual_indexes has {len(deepstack)} entries, more "
                          f"than the {t['num_hidden_layers']} LM layers they feed (one each, from layer 0)")
    return ModelSpec(
        name,
        TextSpec(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
                 t["intermediate_size"], t["vocab_size"], bool(raw.get("tie_word_embeddings", False)),
                 kv_channels=head_dim, qkv_bias=bias, o_bias=bias, qk_norm=True),
        VisionSpec(v["depth"], v["hidden_size"], v["num_heads"], v["intermediate_size"], v["out_hidden_size"],
                   v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"], v["in_channels"],
                   **(_QWEN3_VISION | {"pos_embeddings": v["num_position_embeddings"]}), deepstack=tuple(deepstack)),
        QWEN3_VL,
    )


def _layer_indexes(value, depth: int) -> bool:
    """Whether ``value`` is a list of distinct layer indexes in ``[0, depth)``."""
    return (isinstance(value, list) and all(type(i) is int and 0 <= i < depth for i in value)
            and len(set(value)) == len(value))


def _positive_int(cfg: dict, key: str, source: str, section: str) -> int:
    if key not in cfg:
        raise ConfigError(f"{source}: {section} has no {key!r}; is this a model's whole config.json?")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {section}.{key} = {value!r}; expected a positive integer")
    return value
