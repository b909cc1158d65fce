"""Qwen2.5-VL on megatron-core: vision tower + M-RoPE decoder, TP x PP, "local" or "te" layer specs.

The names below are imported on first use, so ``size`` (``Dims``, used by ``convert``) imports without
megatron-core.
"""
import importlib

_LAZY = {"Qwen2_5_VLModel": "model", "get_rope_index": "rope_index", "build_layer_specs": "specs"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
