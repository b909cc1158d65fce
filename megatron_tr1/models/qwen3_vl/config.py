"""HF ``Qwen3VLConfig`` -> megatron-core ``TransformerConfig`` for the Qwen3 decoder and the Qwen3-VL vision tower.

Like Qwen2.5-VL's (``models.qwen2_5_vl.config``): both carry the parallel layout, dtype and init placement; the vision
tower lives whole on the first pipeline stage. ``validate_layout`` refuses what the model cannot be sharded into
(``Dims.validate``, which also keeps every DeepStack-fed LM layer on stage 0) and what this implementation does not
cover, naming the field and value.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.config import VISION_NORM_EPS, _common, head_dim, recompute_options
from megatron_tr1.models.qwen2_5_vl.size import Dims

# vision_config.hidden_act -> the function (HF ACT2FN names); the merger's GELU is always exact (nn.GELU())
VISION_ACTS = {"gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu,
               "silu": F.silu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
for _name, _fn in VISION_ACTS.items():  # megatron-core's checkpointing code reads __name__
    if isinstance(_fn, functools.partial):
        _fn.__name__ = _name


def validate_layout(hf_config, tp: int, pp: int) -> None:
    """Raise ``ConfigError`` unless the model can be sharded into TP x PP with DeepStack's LM layers on stage 0, and
    uses what this implementation supports (SiLU LM, a known vision activation, default RoPE with an M-RoPE section
    summing to head_dim/2)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    Dims.from_hf_config(hf_config, source="HF config").validate(tp, pp, "model.tensor_parallel={}",
                                                                "model.pipeline_parallel={}")
    if text.hidden_act != "silu":
        raise ConfigError(f"text_config.hidden_act={text.hidden_act!r} is not supported; Qwen3-VL uses 'silu'")
    if vision.hidden_act not in VISION_ACTS:
        raise ConfigError(f"vision_config.hidden_act={vision.hidden_act!r} is not one of {sorted(VISION_ACTS)}")
    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"text_config.rope_parameters.rope_type={rope.get('rope_type')!r} is not supported "
                          "(only 'default' M-RoPE)")
    section = rope.get("mrope_section")
    if section is None or len(section) != 3 or sum(section) * 2 != head_dim(text):
        raise ConfigError(f"text_config.rope_parameters.mrope_section={section} must be 3 numbers summing to "
                          f"head_dim/2={head_dim(text) // 2}")
    indexes = list(vision.deepstack_visual_indexes)
    if len(set(indexes)) != len(indexes) or any(not 0 <= i < vision.depth for i in indexes):
        raise ConfigError(f"vision_config.deepstack_visual_indexes={indexes} must be distinct vision block indexes "
                          f"in [0, depth={vision.depth})")


def language_config(hf_config, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32,
                    cpu_init: bool = False, sequence_parallel: bool = False, recompute: str = "none"
                    ) -> TransformerConfig:
    """The Qwen3 decoder config: GQA with its own head_dim, QK-norm (RMSNorm per head), no biases, RMSNorm,
    SwiGLU. The M-RoPE angles are the model's own (``language.InterleavedMRoPE``); ``mrope_section`` is kept for
    megatron's GPTModel. ``recompute``: "none", "selective" or "full" (as Qwen2.5-VL's)."""
    remat = recompute_options(recompute)
    validate_layout(hf_config, tp, pp)
    text = hf_config.text_config
    return TransformerConfig(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads, num_query_groups=text.num_key_value_heads,
        kv_channels=head_dim(text), ffn_hidden_size=text.intermediate_size, layernorm_epsilon=text.rms_norm_eps,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        mrope_section=list(text.rope_parameters["mrope_section"]), pipeline_model_parallel_size=pp, **remat,
        **_common(tp, params_dtype, cpu_init, sequence_parallel))


def vision_config(hf_config, tp: int = 1, params_dtype: torch.dtype = torch.float32, cpu_init: bool = False,
                  sequence_parallel: bool = False) -> TransformerConfig:
    """The vision-tower config: MHA with bias on every linear, LayerNorm (eps 1e-6, with bias), a non-gated MLP with
    ``vision_config.hidden_act``."""
    vision = hf_config.vision_config
    common = _common(tp, params_dtype, cpu_init, sequence_parallel)
    common.update(normalization="LayerNorm", gated_linear_unit=False, activation_func=VISION_ACTS[vision.hidden_act])
    return TransformerConfig(
        num_layers=vision.depth, hidden_size=vision.hidden_size, num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads, kv_channels=vision.hidden_size // vision.num_heads,
        ffn_hidden_size=vision.intermediate_size, layernorm_epsilon=VISION_NORM_EPS, add_bias_linear=True,
        add_qkv_bias=True, pipeline_model_parallel_size=1, **common)
