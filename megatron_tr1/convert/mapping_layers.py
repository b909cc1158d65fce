"""The rows of THE HF <-> Megatron table (``convert.mapping`` is the module to import): which Megatron tensor of which
pipeline stage is made of which HF tensors, and how (its ``kind``), for Qwen2.5-VL and Qwen3-VL (dense).

HF names are the ``save_pretrained`` (on-disk) ones: Qwen2.5-VL ``model.layers.N`` / ``visual.*``; Qwen3-VL
``model.language_model.layers.N`` / ``model.visual.*`` (transformers 5 saves it as it holds it in memory, and so do
the Qwen/Qwen3-VL-* checkpoints). Megatron names use the "local" spelling and the stage-local layer index.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tr1.models.family import QWEN3_VL
from megatron_tr1.models.qwen2_5_vl.size import Dims

REPLICATED, COLUMN, ROW, QKV, QKV_FUSED, GATE_UP = "replicated", "column", "row", "qkv", "qkv_fused", "gate_up"
# (LM, vision) on-disk name prefixes of each family
_PREFIXES = {QWEN3_VL: ("model.language_model", "model.visual")}
_QWEN2_5_PREFIXES = ("model", "visual")


def hf_prefixes(d: Dims) -> tuple[str, str]:
    """(LM, vision) on-disk name prefixes of ``d``'s family."""
    return _PREFIXES.get(d.family, _QWEN2_5_PREFIXES)


@dataclass(frozen=True)
class Param:
    """One Megatron tensor of one pipeline stage and the HF tensors it is made of."""

    mcore: str  # local-spelling name with the stage-local layer index
    hf: tuple[str, ...]  # HF on-disk names, in fusion order (q, k, v / gate, up)
    kind: str
    hf_shapes: tuple[tuple[int, ...], ...]
    groups: int = 0  # QKV kinds: query groups, heads per group, head dim
    heads_per_group: int = 0
    head_dim: int = 0
    embedding_copy: bool = False  # tied output layer on the last stage: not a separate HF tensor

    def expected_shard_shape(self, tp_size: int) -> tuple[int, ...]:
        """The shape of one TP shard."""
        first = self.hf_shapes[0]
        if self.kind == REPLICATED:
            return first
        if self.kind == ROW:
            return (first[0], first[1] // tp_size)
        rows = sum(s[0] for s in self.hf_shapes) // tp_size
        return (rows, *first[1:])


def _suffixes(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def _norm(m: str, h: str, width: int, bias: bool) -> list[Param]:
    return [Param(f"{m}.{s}", (f"{h}.{s}",), REPLICATED, ((width,),)) for s in _suffixes(bias)]


def _language_layer(m: str, h: str, d: Dims) -> list[Param]:
    """LM layer ``m`` (Megatron prefix, ends with '.') from HF layer ``h``: RMSNorms, GQA with q/k/v fused per query
    group (bias: Qwen2.5), QK-norm (Qwen3), o_proj, SwiGLU with gate/up fused."""
    hid, hd, g = d.hidden, d.head_dim, d.groups
    qkv = dict(groups=g, heads_per_group=d.heads // g, head_dim=hd)
    out = _norm(m + "input_layernorm", h + "input_layernorm", hid, False)
    for suffix in _suffixes(d.qkv_bias):
        tail = (hid,) if suffix == "weight" else ()
        out.append(Param(m + f"self_attention.linear_qkv.{suffix}", tuple(h + f"self_attn.{x}_proj.{suffix}"
                                                                          for x in "qkv"), QKV,
                         ((d.heads * hd, *tail), (g * hd, *tail), (g * hd, *tail)), **qkv))
    if d.qk_norm:
        out += _norm(m + "self_attention.q_layernorm", h + "self_attn.q_norm", hd, False)
        out += _norm(m + "self_attention.k_layernorm", h + "self_attn.k_norm", hd, False)
    out.append(Param(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), ROW,
                     ((hid, d.heads * hd),)))
    out += _norm(m + "pre_mlp_layernorm", h + "post_attention_layernorm", hid, False)
    out.append(Param(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), GATE_UP,
                     ((d.ffn, hid), (d.ffn, hid))))
    out.append(Param(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), ROW, ((hid, d.ffn),)))
    return out


def _vision_layer(m: str, h: str, d: Dims) -> list[Param]:
    """Vision block: norm1/norm2 (RMSNorm, or LayerNorm with bias), fused qkv (one group per head) and proj with
    bias, MLP with bias: SwiGLU gate/up/down (Qwen2.5-VL) or linear_fc1 -> act -> linear_fc2 (Qwen3-VL)."""
    hid, ffn = d.v_hidden, d.v_ffn
    out = _norm(m + "input_layernorm", h + "norm1", hid, d.v_norm_bias)
    for suffix in ("weight", "bias"):
        tail = (hid,) if suffix == "weight" else ()
        out.append(Param(m + f"self_attention.linear_qkv.{suffix}", (h + f"attn.qkv.{suffix}",), QKV_FUSED,
                         ((3 * hid, *tail),), groups=d.v_heads, heads_per_group=1, head_dim=d.v_head_dim))
    out += [Param(m + "self_attention.linear_proj.weight", (h + "attn.proj.weight",), ROW, ((hid, hid),)),
            Param(m + "self_attention.linear_proj.bias", (h + "attn.proj.bias",), REPLICATED, ((hid,),))]
    out += _norm(m + "pre_mlp_layernorm", h + "norm2", hid, d.v_norm_bias)
    fc1, fc2 = (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj") if d.v_gated else (("mlp.linear_fc1",),
                                                                                        "mlp.linear_fc2")
    for suffix in ("weight", "bias"):
        tail = (hid,) if suffix == "weight" else ()
        out.append(Param(m + f"mlp.linear_fc1.{suffix}", tuple(h + f"{x}.{suffix}" for x in fc1),
                         GATE_UP if d.v_gated else COLUMN, tuple((ffn, *tail) for _ in fc1)))
    out += [Param(m + "mlp.linear_fc2.weight", (h + fc2 + ".weight",), ROW, ((hid, ffn),)),
            Param(m + "mlp.linear_fc2.bias", (h + fc2 + ".bias",), REPLICATED, ((hid,),))]
    return out


def _merger(m: str, h: str, d: Dims, norm_width: int) -> list[Param]:
    """A patch merger: norm (Qwen2.5-VL ``ln_q``, RMSNorm; Qwen3-VL ``norm``, LayerNorm), fc1 (column), fc2 (row)."""
    mh = d.merger_hidden
    if d.family == QWEN3_VL:
        norm, fc1, fc2 = _norm(m + "norm", h + "norm", norm_width, True), h + "linear_fc1", h + "linear_fc2"
    else:
        norm, fc1, fc2 = _norm(m + "ln_q", h + "ln_q", norm_width, False), h + "mlp.0", h + "mlp.2"
    return norm + [Param(m + "linear_fc1.weight", (fc1 + ".weight",), COLUMN, ((mh, mh),)),
                   Param(m + "linear_fc1.bias", (fc1 + ".bias",), COLUMN, ((mh,),)),
                   Param(m + "linear_fc2.weight", (fc2 + ".weight",), ROW, ((d.v_out, mh),)),
                   Param(m + "linear_fc2.bias", (fc2 + ".bias",), REPLICATED, ((d.v_out,),))]


def _vision(d: Dims) -> list[Param]:
    _, vis = hf_prefixes(d)
    out = [Param("vision.patch_embed.proj.weight", (f"{vis}.patch_embed.proj.weight",), REPLICATED,
                 ((d.v_hidden, *d.v_patch),))]
    if d.v_patch_bias:
        out.append(Param("vision.patch_embed.proj.bias", (f"{vis}.patch_embed.proj.bias",), REPLICATED,
                         ((d.v_hidden,),)))
    if d.v_pos_embed:
        out.append(Param("vision.pos_embed.weight", (f"{vis}.pos_embed.weight",), REPLICATED,
                         ((d.v_pos_embed, d.v_hidden),)))
    for i in range(d.v_depth):
        out += _vision_layer(f"vision.decoder.layers.{i}.", f"{vis}.blocks.{i}.", d)
    out += _merger("vision.merger.", f"{vis}.merger.", d, d.v_hidden)
    for k in range(d.deepstack):  # use_postshuffle_norm: the norm runs after the 2x2 concatenation
        out += _merger(f"vision.deepstack_merger_list.{k}.", f"{vis}.deepstack_merger_list.{k}.", d, d.merger_hidden)
    return out


def params(d: Dims, pp_rank: int, pp_size: int) -> list[Param]:
    """The Params of pipeline stage ``pp_rank`` (vision, embedding, layers, final norm, output), in order."""
    lm, _ = hf_prefixes(d)
    embedding = f"{lm}.embed_tokens.weight"
    out: list[Param] = []
    per_stage = d.layers // pp_size
    if pp_rank == 0:
        out += _vision(d)
        out.append(Param("language_model.embedding.word_embeddings.weight", (embedding,), COLUMN,
                         ((d.vocab, d.hidden),)))
    for i in range(per_stage):
        out += _language_layer(f"language_model.decoder.layers.{i}.", f"{lm}.layers.{pp_rank * per_stage + i}.", d)
    if pp_rank == pp_size - 1:
        out += _norm("language_model.decoder.final_layernorm", f"{lm}.norm", d.hidden, False)
        if not d.tied:
            out.append(Param("language_model.output_layer.weight", ("lm_head.weight",), COLUMN, ((d.vocab, d.hidden),)))
        elif pp_size > 1:
            out.append(Param("language_model.output_layer.weight", (embedding,), COLUMN, ((d.vocab, d.hidden),),
                             embedding_copy=True))
    return out
