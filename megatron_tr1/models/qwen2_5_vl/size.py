"""The sizes of a Qwen2.5-VL model and the TP x PP layouts it can be sharded into.

``Dims`` is read from an HF config (``Qwen2_5_VLConfig`` or a config.json dict). The model (``config.py``) and
the conversion table (``convert.mapping``) both use it, so "which layouts exist" is decided once.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.family import QWEN2_5_VL, require_supported


def _last_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen2.5-VL model that the table needs, read from its HF config."""

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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def v_head_dim(self) -> int:
        return self.v_hidden // self.v_heads

    @property
    def merger_hidden(self) -> int:
        return self.v_hidden * self.v_merge ** 2

    @classmethod
    def from_hf_config(cls, config: Any, source: str = "config.json",
                       command: str = "tr1 train / eval / convert / verify") -> "Dims":
        """From a ``Qwen2_5_VLConfig``, or a config.json dict in the transformers 4 or 5 layout. Another family's
        config (Qwen3-VL: recognised, not yet supported) is refused, naming ``command`` (``models.family``)."""
        from transformers import Qwen2_5_VLConfig

        # without a model_type: a Qwen2.5-VL config (the older flat layout); Qwen2_5_VLConfig would read any other
        require_supported(config, source, command, default=QWEN2_5_VL)
        if isinstance(config, Mapping):
            try:
                config = Qwen2_5_VLConfig.from_dict(dict(config))
            except Exception as e:  # transformers' own validation, e.g. layer_types vs num_hidden_layers
                raise ConfigError(f"{source}: not a valid Qwen2.5-VL config ({_last_line(e)}); fix the field "
                                  "or re-export the config with save_pretrained") from None
        t, v = config.text_config, config.vision_config
        try:
            return cls(hidden=t.hidden_size, ffn=t.intermediate_size, heads=t.num_attention_heads,
                       groups=t.num_key_value_heads, vocab=t.vocab_size, layers=t.num_hidden_layers,
                       tied=bool(config.tie_word_embeddings), v_hidden=v.hidden_size, v_ffn=v.intermediate_size,
                       v_heads=v.num_heads, v_depth=v.depth, v_out=v.out_hidden_size,
                       v_merge=v.spatial_merge_size,
                       v_patch=(v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), source=source)
        except AttributeError as e:
            raise ConfigError(f"{source}: not a Qwen2.5-VL config ({e}); pass the config.json of a "
                              "Qwen2_5_VLForConditionalGeneration checkpoint") from None

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
