"""Qwen2.5-VL on megatron-core: vision tower + M-RoPE decoder, TP x PP, "local" or "te" layer specs."""
from megatron_tr1.models.qwen2_5_vl.model import Qwen2_5_VLModel
from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_tr1.models.qwen2_5_vl.specs import build_layer_specs

__all__ = ["Qwen2_5_VLModel", "get_rope_index", "build_layer_specs"]
