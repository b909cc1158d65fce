"""Weight sync: stream the Megatron policy (any TP x PP) into a rollout engine as HF tensors, in bounded buckets.

Every rank of the model-parallel group calls ``sync_weights(model, hf_config, engine)`` with the same model;
ranks without an engine pass ``engine=None`` and only take part in the collectives. Parameters are walked in
``convert.mapping.params`` order, stage by stage: the owning stage all-gathers each TP-split tensor over its TP
group and re-fuses it into HF tensors with ``mapping.merge`` (QKV, gate/up), then the stage broadcasts them
over the PP group. Tensors are cast to the engine's dtype and packed into buckets of at most ``bucket_bytes``;
a bucket is filled, handed to the engine tensor by tensor (each released once consumed), then the next is
filled, so no more than ``bucket_bytes`` of converted weights are ever buffered (plus the parameter being
gathered and the tensor the engine is loading). The whole stream goes through one ``engine.update_weights`` call per sync.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_tr1.convert import mapping
from megatron_tr1.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_BUCKET_BYTES = 512 * 2 ** 20


@dataclasses.dataclass
class SyncStats:
    """What one sync moved: seconds, HF tensors, bytes (in the engine dtype), buckets, largest bucket."""

    seconds: float = 0.0
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    peak_bucket_bytes: int = 0


def _too_small(bucket_bytes: int, name: str, shape, dtype: torch.dtype, size: int) -> ConfigError:
    return ConfigError(f"rollout.sync_bucket_bytes={bucket_bytes} is smaller than tensor {name} {list(shape)} in "
                       f"{dtype} ({size} bytes); set it to at least {size}")


def check_bucket_bytes(dims: mapping.Dims, dtype: torch.dtype, bucket_bytes: int) -> None:
    """ConfigError naming the largest HF tensor unless it fits in one bucket (checked before any collective)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    size, name, shape = max((math.prod(shape) * itemsize, name, shape) for _, p in mapping.all_params(dims, 1)
                            for name, shape in zip(p.hf, p.hf_shapes))
    if size > bucket_bytes:
        raise _too_small(bucket_bytes, name, shape, dtype, size)


def _local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's weights by local-spelling Megatron name (the unwrapped ``Qwen2_5_VLModel``)."""
    return {mapping.mcore_local_name(k): v for k, v in model.state_dict().items() if mapping.is_weight_name(k)}


def gathered_hf_tensors(model: torch.nn.Module, dims: mapping.Dims) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for the whole model, on every rank of the model-parallel group (collective)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank()]
    state = _local_state(model)
    mapping.check_rank_names(state, mapping.params(dims, pp_rank, pp_size), f"weight sync, pp stage {pp_rank}")
    first = next(iter(state.values()))
    for stage in range(pp_size):
        for p in mapping.params(dims, stage, pp_size):
            if p.embedding_copy:  # the tied output layer: the first stage sends the embedding itself
                continue
            if stage == pp_rank:
                shard = state[p.mcore].detach()
                if p.kind == mapping.REPLICATED or tp_size == 1:
                    shards = [shard] * tp_size
                else:
                    shards = [torch.empty_like(shard) for _ in range(tp_size)]
                    dist.all_gather(shards, shard.contiguous(), group=tp_group)
                full = mapping.merge(p, shards)
            else:
                full = {name: torch.empty(shape, dtype=first.dtype, device=first.device)
                        for name, shape in zip(p.hf, p.hf_shapes)}
            if pp_size > 1:
                for tensor in full.values():
                    dist.broadcast(tensor, src=pp_ranks[stage], group=pp_group)
            yield from full.items()


def bucketed(named: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, bucket_bytes: int,
             stats: SyncStats) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``named`` cast to ``dtype``, filled into buckets of at most ``bucket_bytes`` and released
    one by one as the consumer takes them; ``stats`` records bytes, buckets and the largest bucket."""
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


def sync_weights(model: torch.nn.Module, hf_config, engine=None, dtype: torch.dtype = torch.bfloat16,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """Push this policy's weights into ``engine`` (on ranks that hold one); collective over TP and PP.

    ``model`` is the unwrapped ``Qwen2_5_VLModel`` of this rank; ``dtype`` is the engine's weight dtype.
    Returns the sync's ``SyncStats`` (the time is also logged; bytes and buckets count on engine ranks only).
    """
    dims = mapping.Dims.from_hf_config(hf_config)
    check_bucket_bytes(dims, dtype, bucket_bytes)
    stats = SyncStats()
    start = time.perf_counter()
    with torch.no_grad():
        stream = gathered_hf_tensors(model, dims)
        if engine is not None:
            stream = bucketed(stream, dtype, bucket_bytes, stats)
            engine.update_weights(stream)
        collections.deque(stream, maxlen=0)  # whatever is left: every rank runs every collective
    stats.seconds = time.perf_counter() - start
    log.info("weight sync: %d tensors, %.1f MB in %d buckets (largest %.1f MB) in %.3f s", stats.tensors,
             stats.bytes / 2 ** 20, stats.buckets, stats.peak_bucket_bytes / 2 ** 20, stats.seconds)
    return stats
