"""Layer specs: the one place that chooses the attention/linear implementation of the model.

``"local"``: megatron-core's own layers (CPU and GPU, no transformer-engine); attention takes explicit
boolean masks (True = masked out): causal + key padding for the decoder; the vision tower's windows or
frames become batch rows (``SegmentBatch``), with a key-padding mask only when their lengths differ.
``"te"``: transformer-engine layers (GPU), norms fused into ``linear_qkv`` / ``linear_fc1``; the decoder
runs TE's causal attention without a mask (so batches must be right-padded: real tokens never see a later pad
key), the vision tower packed ``thd`` sequences with ``cu_seqlens`` per window or frame. The model code calls
``language_attention`` / ``packed_attention`` / ``vision_attention`` / ``run_vision_layer`` and never branches
on the backend itself.

Packed sequences (``packed_attention``: several sequences in one row, ``cu_seqlens`` their bounds) are megatron's
``thd`` format on both specs: transformer-engine attends within each sequence itself; the ``local`` spec's core
attention (``PackedDotProductAttention``) lays the sequences out as batch rows for the attention only (the
projections and MLP run on the packed tokens, with no padding), causal within each sequence.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
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

    @staticmethod
    def packed_attention(cu_seqlens: torch.Tensor) -> dict:
        """The decoder's attention arguments for packed sequences bounded by ``cu_seqlens`` (``[B + 1]``): megatron's
        ``thd`` format on both specs (``PackedDotProductAttention`` for ``local``)."""
        cu = cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        return dict(attention_mask=None, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest))

    def vision_attention(self, cu_seqlens: torch.Tensor):
        """How a vision layer attends within the segments (windows or frames) bounded by ``cu_seqlens``; pass it
        to ``run_vision_layer``. ``"te"``: packed ``thd`` sequences. ``"local"``: a ``SegmentBatch`` - the segments
        become batch rows, so the score matrices are ``[segments, heads, L, L]``, not one ``[n, n]`` block-diagonal
        mask over every patch of the batch (32x less work at 32 frames of 16 patches)."""
        if self.backend == "te":
            cu = cu_seqlens.to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            return dict(attention_mask=None, packed_seq_params=PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest))
        return SegmentBatch.from_cu_seqlens(cu_seqlens)

    def run_vision_layer(self, layer, hidden: torch.Tensor, rotary: torch.Tensor, attention) -> torch.Tensor:
        """``layer`` (a megatron ``TransformerLayer``) on ``hidden`` ``[n, 1, h]`` with 2-D rotary angles
        ``rotary`` ``[n, 1, 1, d]``, attending as ``attention`` (from ``vision_attention``) says."""
        if isinstance(attention, SegmentBatch):
            return attention.run(layer, hidden, rotary)
        return layer(hidden_states=hidden, rotary_pos_emb=rotary, **attention)[0]


@dataclass(frozen=True)
class SegmentBatch:
    """Contiguous segments of a sequence laid out as batch rows ``[L, segments]`` (megatron's ``[s, b]``): row
    ``j`` holds positions ``index[j]``, of which ``valid[j]`` are real; ``mask`` ``[segments, 1, 1, L]`` hides
    the padding keys (None when every segment has the same length, the usual case of same-sized frames)."""

    index: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor | None

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor) -> "SegmentBatch":
        cu = cu_seqlens.long()
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        offsets = torch.arange(int(lengths.max()), device=cu.device)
        valid = offsets[None, :] < lengths[:, None]
        index = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros_like(valid, dtype=torch.long))
        mask = None if bool(valid.all()) else ~valid[:, None, None, :]
        return SegmentBatch(index, valid, mask)

    def run(self, layer, hidden: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        rows = hidden[:, 0][self.index].transpose(0, 1)  # [L, segments, h]
        angles = rotary[:, 0][self.index].transpose(0, 1)  # [L, segments, 1, d]
        out = layer(hidden_states=rows, rotary_pos_emb=angles, attention_mask=self.mask)[0]
        return out.transpose(0, 1)[self.valid].unsqueeze(1)  # back to [n, 1, h], the original order


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local core attention, plus packed ``thd`` sequences: query / key / value ``[t, heads, d]``
    bounded by ``packed_seq_params.cu_seqlens_q`` become batch rows ``[L, sequences, heads, d]`` (``SegmentBatch``)
    attended causally within each sequence, and come back as ``[t, heads * d]``."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        rows = SegmentBatch.from_cu_seqlens(packed_seq_params.cu_seqlens_q)
        q, k, v = (x[rows.index].transpose(0, 1) for x in (query, key, value))  # [L, sequences, heads, d]
        length = q.shape[0]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=q.device), diagonal=1)
        mask = causal[None, None] | ~rows.valid[:, None, None, :]
        out = super().forward(q, k, v, mask, attn_mask_type, attention_bias)  # [L, sequences, heads * d]
        return out.transpose(0, 1)[rows.valid]


def build_layer_specs(backend: str = "local", qk_layernorm: bool = False) -> LayerSpecs:
    """Specs for ``backend`` ("local" or "te"); "te" needs transformer-engine importable. ``qk_layernorm``: the
    decoder layers normalise q and k per head (``q_layernorm`` / ``k_layernorm``, Qwen3's QK-norm); the vision
    layers never do. The norm class follows each ``TransformerConfig.normalization`` (RMSNorm or LayerNorm)."""
    if backend == "local":
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        language = _with_mask_type(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)
                                   if qk_layernorm else layer, AttnMaskType.causal)
        language.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
        return LayerSpecs(backend, language, _with_mask_type(layer, AttnMaskType.padding))
    if backend == "te":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        except ImportError as exc:
            raise ConfigError(f"model.layer_spec='te' needs transformer-engine ({exc}); install it "
                              "(pip install transformer-engine[pytorch]) or use model.layer_spec='local'") from exc
        layer = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
        language = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm", qk_layernorm=True) \
            if qk_layernorm else layer
        return LayerSpecs(backend, _with_mask_type(language, AttnMaskType.causal),
                          _with_mask_type(layer, AttnMaskType.padding))
    raise ConfigError(f"model.layer_spec={backend!r} is not one of {BACKENDS}")
