"""HF ``Qwen2_5_VLConfig`` -> megatron-core ``TransformerConfig`` for the language model and the vision tower.

Both configs carry the parallel layout (TP, PP), dtype and init placement; the vision tower always has
``pipeline_model_parallel_size=1`` because it lives whole on the first pipeline stage. ``validate_layout``
refuses layouts the model cannot be sharded into, naming the field and value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tr1.models.qwen2_5_vl.size import Dims
from megatron_tr1.errors import ConfigError

VISION_NORM_EPS = 1e-6  # fixed in Qwen2.5-VL's vision blocks and merger (not in the HF config)


def validate_layout(hf_config, tp: int, pp: int) -> None:
    """Raise ``ConfigError`` unless the model can be sharded into TP x PP (the split sizes are the conversion
    table's, ``Dims.validate``) and uses what this implementation supports (SiLU, an M-RoPE section)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    Dims.from_hf_config(hf_config, source="HF config").validate(tp, pp, "tensor_parallel={}", "pipeline_parallel={}")
    for field, act in (("text_config.hidden_act", text.hidden_act), ("vision_config.hidden_act", vision.hidden_act)):
        if act != "silu":
            raise ConfigError(f"{field}={act!r} is not supported; Qwen2.5-VL uses 'silu'")
    section = text.rope_parameters.get("mrope_section")
    if section is None or sum(section) * 2 != head_dim(text):
        raise ConfigError(f"text_config.rope_parameters.mrope_section={section} must sum to head_dim/2="
                          f"{head_dim(text) // 2}")


def head_dim(text) -> int:
    """The attention head size of a text config: its ``head_dim`` where it has one, else hidden / heads."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def recompute_options(recompute: str) -> dict:
    """``TransformerConfig`` arguments for ``model.recompute``: "none", "selective" (core attention) or "full" (every
    layer, one per checkpoint)."""
    if recompute not in ("none", "selective", "full"):
        raise ConfigError(f"model.recompute={recompute!r} must be one of none, selective, full")
    remat = {} if recompute == "none" else {"recompute_granularity": recompute}
    if recompute == "full":
        remat.update(recompute_method="uniform", recompute_num_layers=1)
    return remat


def _common(tp: int, params_dtype: torch.dtype, cpu_init: bool, sequence_parallel: bool) -> dict:
    return dict(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel, params_dtype=params_dtype,
                pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                fp16=params_dtype == torch.float16, use_cpu_initialization=cpu_init,
                hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True,
                activation_func=F.silu, bias_activation_fusion=False, masked_softmax_fusion=False,
                bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
                gradient_accumulation_fusion=False)


def language_config(hf_config, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32,
                    cpu_init: bool = False, sequence_parallel: bool = False, recompute: str = "none"
                    ) -> TransformerConfig:
    """The decoder config: GQA, QKV bias only, RMSNorm, SwiGLU, M-RoPE sections from the HF config.
    ``recompute``: "none", "selective" (core attention) or "full" (every layer, one per checkpoint)."""
    remat = recompute_options(recompute)
    validate_layout(hf_config, tp, pp)
    text = hf_config.text_config
    return TransformerConfig(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads, num_query_groups=text.num_key_value_heads,
        kv_channels=head_dim(text), ffn_hidden_size=text.intermediate_size, layernorm_epsilon=text.rms_norm_eps,
        add_bias_linear=False, add_qkv_bias=True, mrope_section=list(text.rope_parameters["mrope_section"]),
        pipeline_model_parallel_size=pp, **remat, **_common(tp, params_dtype, cpu_init, sequence_parallel))


def vision_config(hf_config, tp: int = 1, params_dtype: torch.dtype = torch.float32, cpu_init: bool = False,
                  sequence_parallel: bool = False) -> TransformerConfig:
    """The vision-tower config: MHA with bias on every linear, RMSNorm (eps 1e-6), SwiGLU with bias."""
    vision = hf_config.vision_config
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads, kv_channels=vision.hidden_size // vision.num_heads,
        ffn_hidden_size=vision.intermediate_size, layernorm_epsilon=VISION_NORM_EPS, add_bias_linear=True,
        add_qkv_bias=True, pipeline_model_parallel_size=1,
        **_common(tp, params_dtype, cpu_init, sequence_parallel))
