"""Test support: whole-model references built from the conversion table (``convert.mapping``).

``mcore_to_hf_state`` rebuilds every HF tensor from all ranks' Megatron state dicts at once (tests compare a
parallel model's weights or gradients with HF's this way); production streams the same merge one tensor at a
time (``convert.checkpoint.MCoreReader``, ``rollout.weight_sync``). ``bucketed`` applies the weight sync's bucket
packing to any ``(name, tensor)`` stream, without collectives (the reference ``bucket_plan`` is tested against).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import collections

import torch

from megatron_tr1.convert import mapping
from megatron_tr1.rollout.weight_sync import SyncStats, _too_small


def _mcore_to_hf(p: mapping.Param, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF full tensors of one Param from all its TP shards (``{}`` for the tied output copy, which is not an HF
    tensor of its own)."""
    return {} if p.embedding_copy else mapping.merge(p, shards)


def mcore_to_hf_state(rank_states: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], hf_config: Any,
                      tp_size: int, pp_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for the whole model from ``{(tp_rank, pp_rank): state_dict}`` of every rank
    (either spelling), checking every rank for missing and unexpected tensors."""
    d = hf_config if isinstance(hf_config, mapping.Dims) else mapping.Dims.from_hf_config(hf_config)
    d.validate(tp_size, pp_size)
    for pp_rank in range(pp_size):
        stage = mapping.params(d, pp_rank, pp_size)
        states = []
        for tp_rank in range(tp_size):
            state = {mapping.mcore_local_name(k): v for k, v in rank_states[tp_rank, pp_rank].items()
                     if mapping.is_weight_name(k)}
            mapping.check_rank_names(state.keys(), stage, f"rank tp={tp_rank} pp={pp_rank}")
            states.append(state)
        for p in stage:
            yield from _mcore_to_hf(p, [s[p.mcore] for s in states]).items()


def bucketed(named: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, bucket_bytes: int,
             stats: SyncStats) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``named`` cast to ``dtype``, filled into buckets of at most ``bucket_bytes`` and released
    one by one as the consumer takes them; ``stats`` records bytes, buckets and the largest bucket. The same
    packing as ``bucket_plan``, for a stream whose shapes are not known in advance (no collectives)."""
    bucket: collections.deque = collections.deque()
    size = 0

    def drain():
        stats.buckets += 1
        stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, size)
        while bucket:
            yield bucket.popleft()

    for name, tensor in named:
        tensor = tensor.to(dtype).contiguous()
        if tensor.nbytes > bucket_bytes:
            raise _too_small(bucket_bytes, name, tensor.shape, dtype, tensor.nbytes)
        if size + tensor.nbytes > bucket_bytes:
            yield from drain()
            size = 0
        bucket.append((name, tensor))
        size += tensor.nbytes
        stats.tensors += 1
        stats.bytes += tensor.nbytes
    if bucket:
        yield from drain()
