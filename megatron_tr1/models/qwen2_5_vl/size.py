"""The sizes of a Qwen2.5-VL or Qwen3-VL (dense) model and the TP x PP layouts it can be sharded into.

``Dims`` is read from an HF config (``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` or a config.json dict; the family from
``model_type``, ``models.family``). The models (``config.py``) and the conversion table (``convert.mapping``) both
use it, so "which layouts exist" is decided once. Qwen3-VL adds: QK-norm and a ``head_dim`` of its own, no QKV
bias, LayerNorm (with bias) and a non-gated MLP in the vision blocks, a patch embedding with bias, a learned
position embedding, and DeepStack mergers whose features feed LM layers 0 .. deepstack-1 (all on stage 0).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.family import NAMES, QWEN2_5_VL, QWEN3_VL, family_of


def _last_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


@dataclass(frozen=True)
class Dims:
    """The sizes of a model that the table needs, read from its HF config (defaults: Qwen2.5-VL's features)."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int
    layers: int
    tied: bool
    v_hidden: int
    v_ffn: int
    v_heads: int
    v_depth: int
    v_out: int
    v_merge: int  # spatial_merge_size
    v_patch: tuple[int, int, int, int]  # patch embedding kernel: in_channels, temporal, patch, patch
    source: str = "config.json"
    family: str = QWEN2_5_VL
    kv_channels: int = 0  # head_dim when it is not hidden / heads (Qwen3), else 0
    qkv_bias: bool = True  # LM q/k/v projections have a bias (Qwen2.5-VL)
    qk_norm: bool = False  # LM q_norm / k_norm over head_dim (Qwen3)
    v_gated: bool = True  # vision MLP gate/up/down (Qwen2.5-VL) or linear_fc1/linear_fc2 (Qwen3-VL)
    v_norm_bias: bool = False  # vision norms are LayerNorm with bias (Qwen3-VL), merger norm too
    v_patch_bias: bool = False  # patch embedding Conv3d has a bias
    v_pos_embed: int = 0  # learned position embeddings (num_position_embeddings; 0: none)
    deepstack: int = 0  # DeepStack mergers = LM layers fed (0 .. deepstack-1)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @property
    def v_head_dim(self) -> int:
        return self.v_hidden // self.v_heads

    @property
    def merger_hidden(self) -> int:
        return self.v_hidden * self.v_merge ** 2

    @classmethod
    def from_hf_config(cls, config: Any, source: str = "config.json",
                       command: str = "tr1 train / eval / convert / verify") -> "Dims":
        """From a ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``, or a config.json dict (Qwen2.5-VL: the transformers 4 or 5
        layout; no model_type: Qwen2.5-VL's older flat layout). Other families are refused (``models.family``);
        ``command`` is kept for callers' signatures (every family it recognises is supported here)."""
        from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

        family = family_of(config, source, default=QWEN2_5_VL)
        if isinstance(config, Mapping):
            try:
                config = (Qwen3VLConfig if family == QWEN3_VL else Qwen2_5_VLConfig).from_dict(dict(config))
            except Exception as e:  # transformers' own validation, e.g. layer_types vs num_hidden_layers
                raise ConfigError(f"{source}: not a valid {NAMES[family]} config ({_last_line(e)}); fix the field "
                                  "or re-export the config with save_pretrained") from None
        t, v = config.text_config, config.vision_config
        try:
            common = dict(hidden=t.hidden_size, ffn=t.intermediate_size, heads=t.num_attention_heads,
                          groups=t.num_key_value_heads, vocab=t.vocab_size, layers=t.num_hidden_layers,
                          tied=bool(config.tie_word_embeddings), v_hidden=v.hidden_size, v_ffn=v.intermediate_size,
                          v_heads=v.num_heads, v_depth=v.depth, v_out=v.out_hidden_size,
                          v_merge=v.spatial_merge_size,
                          v_patch=(v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), source=source)
            if family == QWEN3_VL:
                if getattr(t, "attention_bias", False):
                    raise ConfigError(f"{source}: text_config.attention_bias=true is not supported (Qwen3-VL "
                                      "checkpoints have no attention bias)")
                head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
                common.update(family=family, kv_channels=head_dim, qkv_bias=False, qk_norm=True, v_gated=False,
                              v_norm_bias=True, v_patch_bias=True, v_pos_embed=v.num_position_embeddings,
                              deepstack=len(v.deepstack_visual_indexes))
            return cls(**common)
        except AttributeError as e:
            raise ConfigError(f"{source}: not a {NAMES[family]} config ({e}); pass the config.json of a "
                              f"{NAMES[family]} checkpoint") from None

    def vision_splits(self, tp_size: int) -> list[str]:
        """The vision-tower sizes ``tp_size`` does not divide (``field=value``); empty when it splits evenly."""
        return [f"{field}={value}" for field, value in (("vision_config.num_heads", self.v_heads),
                                                        ("vision_config.intermediate_size", self.v_ffn),
                                                        ("vision_config.hidden_size*spatial_merge_size**2",
                                                         self.merger_hidden)) if value % tp_size]

    def validate(self, tp_size: int, pp_size: int, tp_label: str = "--tp {}", pp_label: str = "--pp {}",
                 vision: bool = True) -> None:
        """Raise ConfigError unless TP divides every split size and PP divides the number of layers. The labels
        name the layout as the caller's user wrote it (``tr1 convert``'s flags; the model's config keys).
        ``vision=False``: the vision tower is not split (vLLM runs it data-parallel), so its sizes are not checked."""
        tp_name, pp_name = tp_label.format(tp_size), pp_label.format(pp_size)
        if tp_size < 1 or pp_size < 1:
            raise ConfigError(f"{tp_name} {pp_name}: both must be >= 1")
        if self.heads % self.groups:
            raise ConfigError(f"{self.source}: text_config.num_attention_heads={self.heads} is not a multiple of "
                              f"num_key_value_heads={self.groups}; the config is inconsistent")
        for field, value in (("text_config.num_attention_heads", self.heads),
                             ("text_config.num_key_value_heads", self.groups),
                             ("text_config.vocab_size", self.vocab),
                             ("text_config.intermediate_size", self.ffn),
                             *((("vision_config.num_heads", self.v_heads),
                                ("vision_config.intermediate_size", self.v_ffn),
                                ("vision_config.hidden_size*spatial_merge_size**2", self.merger_hidden))
                               if vision else ())):
            if value % tp_size:
                raise ConfigError(f"{tp_name} does not divide {field}={value} ({self.source}); choose a TP "
                                  f"size that divides it")
        if self.layers % pp_size:
            raise ConfigError(f"{pp_name} does not divide text_config.num_hidden_layers={self.layers} "
                              f"({self.source}); choose a PP size that divides it")
        if self.deepstack > self.layers // pp_size:
            raise ConfigError(f"{pp_name} puts LM layers 0-{self.layers // pp_size - 1} on pipeline stage 0, but "
                              f"DeepStack adds vision features after LM layers 0-{self.deepstack - 1} "
                              f"(vision_config.deepstack_visual_indexes has {self.deepstack} entries; {self.source}), "
                              f"which must all sit on stage 0; choose a PP size that leaves at least {self.deepstack} "
                              f"layers per stage")
