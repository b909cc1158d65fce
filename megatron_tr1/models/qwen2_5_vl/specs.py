"""Layer specs: the one place that chooses the attention/linear implementation of the model.

``"local"``: megatron-core's own layers (CPU and GPU, no transformer-engine); attention takes explicit
boolean masks (True = masked out): causal + key padding for the decoder, block-diagonal per window or frame
for the vision tower. ``"te"``: transformer-engine layers (GPU), norms fused into ``linear_qkv`` /
``linear_fc1``; the decoder runs TE's causal attention without a mask (so batches must be right-padded:
real tokens never see a later pad key), the vision tower packed ``thd`` sequences with ``cu_seqlens`` per
window or frame. The model code calls ``language_attention`` / ``vision_attention`` and
never branches on the backend itself.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_tr1.errors import ConfigError

BACKENDS = ("local", "te")


def _with_mask_type(layer: ModuleSpec, mask_type: AttnMaskType) -> ModuleSpec:
    layer = copy.deepcopy(layer)
    layer.submodules.self_attention.params = {"attn_mask_type": mask_type}
    return layer


@dataclass(frozen=True)
class LayerSpecs:
    """Layer specs of the decoder and the vision tower, and how each backend receives attention masks."""

    backend: str
    language_layer: ModuleSpec
    vision_layer: ModuleSpec

    def language_attention(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The decoder's ``attention_mask`` argument from a ``[b, s]`` padding mask (1 = token, 0 = pad)."""
        if attention_mask is None:
            return None
        if self.backend == "te":
            if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ConfigError("model.layer_spec='te' needs right-padded batches (padding only after the "
                                  "tokens); this attention_mask has padding before tokens")
            return None
        pad = ~attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s], True = padding key
        s = attention_mask.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=pad.device), diagonal=1)
        return causal[None, None] | pad

    def vision_attention(self, cu_seqlens: torch.Tensor) -> dict:
        """Keyword arguments for one vision layer attending within the segments bounded by ``cu_seqlens``."""
        if self.backend == "te":
            cu = cu_seqlens.to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            return dict(attention_mask=None, packed_seq_params=PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest))
        n = int(cu_seqlens[-1])
        segment = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device),
                                          (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        return dict(attention_mask=(segment[:, None] != segment[None, :]).view(1, 1, n, n), packed_seq_params=None)


def build_layer_specs(backend: str = "local") -> LayerSpecs:
    """Specs for ``backend`` ("local" or "te"); "te" needs transformer-engine importable."""
    if backend == "local":
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        return LayerSpecs(backend, _with_mask_type(layer, AttnMaskType.causal),
                          _with_mask_type(layer, AttnMaskType.padding))
    if backend == "te":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        except ImportError as exc:
            raise ConfigError(f"model.layer_spec='te' needs transformer-engine ({exc}); install it "
                              "(pip install transformer-engine[pytorch]) or use model.layer_spec='local'") from exc
        layer = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
        return LayerSpecs(backend, _with_mask_type(layer, AttnMaskType.causal),
                          _with_mask_type(layer, AttnMaskType.padding))
    raise ConfigError(f"model.layer_spec={backend!r} is not one of {BACKENDS}")
