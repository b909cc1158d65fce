"""Qwen3-VL (dense) on megatron-core: vision tower with learned positions and DeepStack + QK-norm decoder with
interleaved M-RoPE, TP x PP, "local" or "te" layer specs (the public interface of ``models.qwen2_5_vl``).

The names below are imported on first use, so importing the package needs no megatron-core.
"""
import importlib

_LAZY = {"Qwen3VLModel": "model", "get_rope_index": "rope_index", "InterleavedMRoPE": "language",
         "VisionTower": "vision"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
