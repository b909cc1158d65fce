"""Parameter counts: the whole model (as ``transformers`` builds it) and per GPU under Megatron TP x PP.

Megatron shards column-parallel weights and biases (QKV, gate/up, merger fc1, the vocab-parallel embedding and
output layer) and row-parallel weights (attention out, down, merger fc2) over TP; norms (QK-norm too), row-parallel
biases, the vision patch embedding and Qwen3-VL's learned vision position embedding are replicated on every TP rank.
Qwen3-VL's DeepStack mergers are sharded like the merger. Pipeline stage 0 holds the vision tower, the
embedding and the first L/PP decoder layers; the last stage holds the final norm and the output layer. Tied
embeddings are counted once in the model total, but with PP > 1 the last stage keeps its own copy of the word
embeddings for the output layer (Megatron all-reduces their grads between the first and last stage).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tr1.plan.models import ModelSpec, TextSpec, VisionSpec


@dataclass(frozen=True)
class Count:
    """Parameters split into the part sharded over TP and the part every TP rank replicates."""

    sharded: int = 0
    replicated: int = 0

    def __add__(self, other: Count) -> Count:
        return Count(self.sharded + other.sharded, self.replicated + other.replicated)

    def __mul__(self, k: int) -> Count:
        return Count(self.sharded * k, self.replicated * k)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated

    def per_gpu(self, tp: int) -> int:
        if self.sharded % tp:
            raise ValueError(f"{self.sharded} sharded parameters do not split over TP={tp}")
        return self.sharded // tp + self.replicated


def decoder_layer(t: TextSpec) -> Count:
    """q/k/v (biased in Qwen2.5), o (biased only with Qwen3's attention_bias), SwiGLU gate/up/down without bias, two
    RMSNorms, and with QK-norm (Qwen3) an RMSNorm of head_dim on q and one on k, replicated like the others."""
    q, kv = t.q_width, t.kv_heads * t.head_dim
    qkv = t.hidden * (q + 2 * kv) + (q + 2 * kv if t.qkv_bias else 0)
    replicated = 2 * t.hidden + (2 * t.head_dim if t.qk_norm else 0) + (t.hidden if t.o_bias else 0)
    return Count(sharded=qkv + q * t.hidden + 3 * t.hidden * t.ffn, replicated=replicated)


def _norm(v: VisionSpec, width: int) -> int:
    return 2 * width if v.layer_norm else width


def vision_block(v: VisionSpec) -> Count:
    """Fused qkv and proj with bias, the MLP with bias (SwiGLU gate/up/down, or Qwen3-VL's GELU fc1/fc2), two norms
    (RMSNorm, or LayerNorm with its bias)."""
    h, f = v.hidden, v.ffn
    mlp = 2 * (h * f + f) + f * h if v.gated else (h * f + f) + f * h
    sharded = (3 * h * h + 3 * h) + h * h + mlp
    return Count(sharded=sharded, replicated=h + h + 2 * _norm(v, h))  # proj bias, down bias, norms


def merger(v: VisionSpec, norm_width: int) -> Count:
    """A patch merger: a norm over ``norm_width`` (the patch width; a DeepStack merger's, the merged width), fc1 +
    GELU and fc2 into the LM width; fc1 column-parallel (bias sharded), fc2 row-parallel (bias replicated)."""
    m = v.hidden * v.merge ** 2
    return Count(sharded=m * m + m + m * v.out_hidden, replicated=_norm(v, norm_width) + v.out_hidden)


def vision_tower(v: VisionSpec) -> Count:
    """Conv3d patch embedding (biased in Qwen3-VL), Qwen3-VL's learned position embedding, the blocks, the merger
    and Qwen3-VL's DeepStack mergers (one per ``deepstack`` index, their norm over the merged width)."""
    patch = v.in_channels * v.temporal_patch * v.patch * v.patch * v.hidden + (v.hidden if v.patch_bias else 0)
    deepstack = merger(v, v.hidden * v.merge ** 2) * len(v.deepstack)
    return (Count(replicated=patch + v.pos_embeddings * v.hidden) + vision_block(v) * v.depth + merger(v, v.hidden)
            + deepstack)


def word_embeddings(t: TextSpec) -> Count:
    return Count(sharded=t.vocab * t.hidden)


def total_params(spec: ModelSpec) -> int:
    """All parameters, vision tower included, tied embeddings counted once (``sum(p.numel())`` in transformers)."""
    t = spec.text
    lm_head = 0 if t.tied else word_embeddings(t).total
    return (vision_tower(spec.vision).total + word_embeddings(t).total + decoder_layer(t).total * t.layers
            + t.hidden + lm_head)


def stage_params(spec: ModelSpec, tp: int, pp: int) -> list[int]:
    """Parameters held by one GPU of each pipeline stage (TP and PP must divide the model; see layouts)."""
    t = spec.text
    per_layer = decoder_layer(t).per_gpu(tp) * (t.layers // pp)
    stages = [per_layer] * pp
    stages[0] += vision_tower(spec.vision).per_gpu(tp) + word_embeddings(t).per_gpu(tp)
    output_layer = word_embeddings(t).per_gpu(tp) if (not t.tied or pp > 1) else 0
    stages[-1] += t.hidden + output_layer
    return stages
