"""THE HF <-> Megatron table for Qwen2.5-VL and Qwen3-VL (dense): names, fusion (QKV, gate/up) and TP split, one
tensor at a time (the rows: ``convert.mapping_layers``, re-exported here).

``params(dims, pp_rank, pp_size)`` lists the :class:`Param` s of one pipeline stage: the Megatron name (local
layer index, "local" spelling), the HF names it is made of (``save_pretrained`` on-disk layout, global layer
index) and how it is fused and split by TP (its ``kind``). ``split`` makes one TP shard from the HF tensors,
``merge`` rebuilds the HF tensors from all TP shards. Conversion, ``tr1 verify``, resharding and the rollout
weight sync all iterate this table; nothing else knows HF names.

Megatron layouts: ``linear_qkv`` rows are, per query group (groups split contiguously over TP), the group's q
heads then its k head then its v head (the vision tower has one group per head); ``linear_fc1`` of a TP shard is
``cat[gate_shard, up_shard]`` (Qwen3-VL's non-gated vision ``linear_fc1`` is plain column-parallel). Column-parallel
tensors split on dim 0, row-parallel on dim 1 (their biases are replicated), norms (QK-norm, LayerNorm biases), the
patch embedding and Qwen3-VL's learned position embedding are replicated. Layers are split evenly over PP stages; the vision
tower (with Qwen3-VL's DeepStack mergers) and the word embedding live on the first stage, the final norm and output layer on the last. With tied
embeddings and PP > 1 the last stage holds Megatron's copy of the embedding as ``output_layer``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import torch

from megatron_tr1.convert.mapping_layers import (  # noqa: F401  (re-exported: the table's public names)
    COLUMN, GATE_UP, QKV, QKV_FUSED, REPLICATED, ROW, Param, hf_prefixes, params)
from megatron_tr1.errors import CheckpointError
from megatron_tr1.models.family import NAMES, QWEN2_5_VL, QWEN3_VL
from megatron_tr1.models.qwen2_5_vl.size import Dims

SPECS = ("local", "te")
# transformer-engine spec fuses the pre-attention / pre-MLP norms into the following linear.
_TE_NORMS = {".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
             ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
             ".input_layernorm.bias": ".self_attention.linear_qkv.layer_norm_bias",
             ".pre_mlp_layernorm.bias": ".mlp.linear_fc1.layer_norm_bias"}
# transformers >= 5 in-memory prefixes -> save_pretrained (on-disk) prefixes, per family (Qwen3-VL: the same).
_HF_MEMORY_PREFIXES = {QWEN2_5_VL: (("model.language_model.", "model."), ("model.visual.", "visual.")), QWEN3_VL: ()}
_LIST_MAX = 12


def hf_disk_name(name: str, family: str = QWEN2_5_VL) -> str:
    """The ``save_pretrained`` (on-disk) spelling of an HF name of ``family`` given in either layout (Qwen3-VL's
    on-disk names are its in-memory ones)."""
    for memory, disk in _HF_MEMORY_PREFIXES[family]:
        if name.startswith(memory):
            return disk + name[len(memory):]
    return name


def mcore_local_name(name: str) -> str:
    """The "local"-spec spelling of a Megatron name given in local or transformer-engine spelling."""
    for local, te in _TE_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def mcore_spec_name(name: str, spec: str) -> str:
    """A local-spelling Megatron name in the spelling of ``spec`` ("local" or "te")."""
    if spec == "te":
        for local, te in _TE_NORMS.items():
            if name.endswith(local) and ".decoder.layers." in name:
                return name[: -len(local)] + te
    return name


def is_weight_name(mcore_name: str) -> bool:
    """False for Megatron state-dict entries that are not weights (transformer-engine ``_extra_state``)."""
    return not mcore_name.endswith("_extra_state")


def name_list(names) -> str:
    """``a, b, c (+N more)``: a bounded, sorted listing of tensor names for one-line error messages."""
    names = sorted(names)
    more = f" (+{len(names) - _LIST_MAX} more)" if len(names) > _LIST_MAX else ""
    return ", ".join(names[:_LIST_MAX]) + more


def all_params(d: Dims, pp_size: int) -> Iterator[tuple[int, Param]]:
    """``(pp_rank, Param)`` for every stage, in checkpoint order."""
    for pp_rank in range(pp_size):
        for p in params(d, pp_rank, pp_size):
            yield pp_rank, p


def expected_hf_names(d: Dims) -> tuple[set[str], set[str]]:
    """(required, optional) HF on-disk names of a full checkpoint; ``lm_head.weight`` is optional when tied."""
    required = {n for _, p in all_params(d, 1) for n in p.hf}
    return required, ({"lm_head.weight"} if d.tied else set())


def _check_shapes(p: Param, hf_tensors: list[torch.Tensor], source: str) -> None:
    for name, t, shape in zip(p.hf, hf_tensors, p.hf_shapes):
        if tuple(t.shape) != shape:
            raise CheckpointError(f"config mismatch: tensor {name} has shape {tuple(t.shape)} but {source} implies "
                                  f"{shape}; use the config.json that belongs to these weights")


def split(p: Param, hf_tensors: list[torch.Tensor], tp_rank: int, tp_size: int, source: str = "config.json"
          ) -> torch.Tensor:
    """The TP shard ``tp_rank`` of ``p`` (a fresh contiguous tensor) from its HF tensors (in ``p.hf`` order)."""
    _check_shapes(p, hf_tensors, source)
    if p.kind == REPLICATED:
        return hf_tensors[0].clone()
    if p.kind in (COLUMN, ROW):
        return hf_tensors[0].chunk(tp_size, dim=0 if p.kind == COLUMN else 1)[tp_rank].clone()
    if p.kind == GATE_UP:
        return torch.cat([t.chunk(tp_size, dim=0)[tp_rank] for t in hf_tensors])
    q, k, v = hf_tensors if p.kind == QKV else hf_tensors[0].chunk(3, dim=0)
    g, rest = p.groups, tuple(q.shape[1:])
    fused = torch.cat([q.reshape(g, p.heads_per_group * p.head_dim, *rest), k.reshape(g, p.head_dim, *rest),
                       v.reshape(g, p.head_dim, *rest)], dim=1)
    return fused.chunk(tp_size, dim=0)[tp_rank].reshape(-1, *rest).clone()


def merge(p: Param, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF tensors of ``p`` (name -> tensor) from its TP shards in TP-rank order; inverse of ``split``."""
    if p.kind == REPLICATED:
        return {p.hf[0]: shards[0]}
    if p.kind in (COLUMN, ROW):
        return {p.hf[0]: torch.cat(shards, dim=0 if p.kind == COLUMN else 1)}
    if p.kind == GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {p.hf[0]: torch.cat([h[0] for h in halves]), p.hf[1]: torch.cat([h[1] for h in halves])}
    rest = tuple(shards[0].shape[1:])
    fused = torch.cat(shards).reshape(p.groups, (p.heads_per_group + 2) * p.head_dim, *rest)
    q, k, v = fused.split([p.heads_per_group * p.head_dim, p.head_dim, p.head_dim], dim=1)
    q, k, v = (x.reshape(-1, *rest).clone() for x in (q, k, v))  # own storage: safetensors refuses views
    if p.kind == QKV_FUSED:
        return {p.hf[0]: torch.cat([q, k, v])}
    return dict(zip(p.hf, (q, k, v)))


HFState = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor]]


def hf_getter(hf_state: HFState, d: Dims, pp_rank: int | None, pp_size: int, source: str = "HF state"
              ) -> Callable[[str], torch.Tensor]:
    """A name -> tensor getter over either HF layout. For a Mapping, first checks that no tensor of stage
    ``pp_rank`` (all stages if None) is missing and that no name is unexpected (CheckpointError listing them)."""
    if not isinstance(hf_state, Mapping):
        return lambda name: hf_state(name)
    by_disk = {hf_disk_name(k, d.family): k for k in hf_state.keys()}
    required, optional = expected_hf_names(d)
    stages = range(pp_size) if pp_rank is None else [pp_rank]
    needed = {n for s in stages for p in params(d, s, pp_size) for n in p.hf}
    missing = needed - by_disk.keys()
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {name_list(missing)}; the checkpoint "
                              f"is incomplete or does not match {d.source}")
    unexpected = by_disk.keys() - required - optional
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s): {name_list(unexpected)}; is this "
                              f"a {NAMES[d.family]} checkpoint matching {d.source}?")
    return lambda name: hf_state[by_disk[name]]


def hf_to_mcore_state(hf_state: HFState, hf_config: Any, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int,
                      spec: str = "local") -> dict[str, torch.Tensor]:
    """The Megatron state dict of rank (tp_rank, pp_rank) from a full HF state (Mapping in either layout, or a
    getter taking on-disk names) and its config (``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` or config.json dict)."""
    d = hf_config if isinstance(hf_config, Dims) else Dims.from_hf_config(hf_config)
    d.validate(tp_size, pp_size)
    get = hf_getter(hf_state, d, pp_rank, pp_size)
    return {mcore_spec_name(p.mcore, spec): split(p, [get(n) for n in p.hf], tp_rank, tp_size, d.source)
            for p in params(d, pp_rank, pp_size)}


def check_rank_names(names, stage: list[Param], where: str) -> None:
    """CheckpointError listing missing / unexpected local-spelling Megatron names of one rank."""
    want = {p.mcore for p in stage}
    have = set(names)
    if want - have:
        raise CheckpointError(f"{where}: missing {len(want - have)} tensor(s): {name_list(want - have)}")
    if have - want:
        raise CheckpointError(f"{where}: {len(have - want)} unexpected tensor(s): {name_list(have - want)}")
