"""Weight sync: stream the Megatron policy (any TP x PP) into a rollout engine as HF tensors, in bounded buckets.

Every rank of the model-parallel group calls ``sync_weights(model, hf_config, engine)`` with the same model;
ranks without an engine pass ``engine=None`` and only take part in the collectives. The HF tensors are walked
in ``convert.mapping.params`` order, stage by stage, and packed greedily into buckets of at most
``bucket_bytes`` in the engine's dtype (``bucket_plan``; a bucket never spans two stages). Every rank derives
the same plan from the config, so only data moves: for each bucket the owning stage all-gathers each TP-split
parameter over its TP group, re-fuses it into HF tensors with ``mapping.merge`` (QKV, gate/up), casts them into
one flat buffer and broadcasts that buffer once over the PP group; receivers hand views of it to the engine
tensor by tensor. Collectives per sync and rank: one PP broadcast per bucket (PP > 1) plus one TP all-gather
per TP-split parameter of the owning stage (TP > 1), counted in ``SyncStats.collectives``. A bucket's last
tensor is handed over as a copy, so the buffer is freed before the next bucket is filled even while the engine
still holds that tensor: no more than ``bucket_bytes`` of converted weights are ever buffered (plus the
parameter being gathered, whose HF tensors may straddle two buckets, and the tensor the engine is loading).
The whole stream goes through one ``engine.update_weights`` call per sync.
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
    """What one sync moved: seconds, HF tensors handed to the engine and their bytes (in the engine dtype),
    buckets, largest bucket, the collectives this rank issued (PP broadcasts + TP all-gathers), the bytes it sent
    to and received from other ranks, and the parameters it fed from its own shard (``local``: no gather)."""

    seconds: float = 0.0
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    peak_bucket_bytes: int = 0
    collectives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    local: int = 0


def _too_small(bucket_bytes: int, name: str, shape, dtype: torch.dtype, size: int) -> ConfigError:
    return ConfigError(f"rollout.sync_bucket_bytes={bucket_bytes} is smaller than tensor {name} {list(shape)} in "
                       f"{dtype} ({size} bytes); set it to at least {size}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def effective_bucket_bytes(dims: mapping.Dims, dtype: torch.dtype, bucket_bytes: int) -> int:
    """``bucket_bytes`` (``rollout.sync_bucket_bytes``), raised to the largest HF tensor in ``dtype`` when that does
    not fit (Qwen2.5-VL-3B's embedding is 593 MiB in bf16, 7B's 1.0 GiB: above the 512 MiB default), so every tensor
    fits one bucket; ConfigError unless ``bucket_bytes`` > 0."""
    if bucket_bytes <= 0:
        raise ConfigError(f"rollout.sync_bucket_bytes={bucket_bytes} must be > 0")
    itemsize = _itemsize(dtype)
    size, name = max((math.prod(shape) * itemsize, name) for _, p in mapping.all_params(dims, 1)
                     for name, shape in zip(p.hf, p.hf_shapes))
    if size > bucket_bytes:
        log.debug("weight sync: bucket raised from %d to %d bytes for %s", bucket_bytes, size, name)
    return max(bucket_bytes, size)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One HF tensor in a bucket: its Param, name, shape and element offset in the bucket's flat buffer."""

    param: mapping.Param
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


def bucket_plan(dims: mapping.Dims, stage: int, pp_size: int, dtype: torch.dtype, bucket_bytes: int
                ) -> list[list[_Slot]]:
    """The buckets of pipeline stage ``stage``: its HF tensors in ``mapping.params`` order (the tied output
    layer's embedding copy is not one), packed greedily into buckets of at most ``bucket_bytes`` in ``dtype``.
    The same on every rank; ``effective_bucket_bytes`` first."""
    itemsize, limit = _itemsize(dtype), bucket_bytes // _itemsize(dtype)
    buckets: list[list[_Slot]] = []
    bucket: list[_Slot] = []
    used = 0
    for p in mapping.params(dims, stage, pp_size):
        if p.embedding_copy:  # the tied output layer: the first stage sends the embedding itself
            continue
        for name, shape in zip(p.hf, p.hf_shapes):
            numel = math.prod(shape)
            if numel * itemsize > bucket_bytes:
                raise _too_small(bucket_bytes, name, shape, dtype, numel * itemsize)
            if used + numel > limit:
                buckets.append(bucket)
                bucket, used = [], 0
            bucket.append(_Slot(p, name, tuple(shape), used, numel))
            used += numel
    if bucket:
        buckets.append(bucket)
    return buckets


def _local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's weights by local-spelling Megatron name (the unwrapped ``Qwen2_5_VLModel``)."""
    return {mapping.mcore_local_name(k): v for k, v in model.state_dict().items() if mapping.is_weight_name(k)}


def gathered_hf_tensors(model: torch.nn.Module, dims: mapping.Dims, dtype: torch.dtype = torch.float32,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES, stats: SyncStats | None = None,
                        keep: bool = True, gathered: frozenset | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor in dtype)`` for the whole model, on every rank of the model-parallel group
    (collective), bucket by bucket as the module docstring says; ``stats`` counts what this rank buffered and
    the collectives it issued. The tensors are views of the current bucket: copy what must outlive the next
    ``next()``. ``keep=False`` (a rank without an engine) runs the collectives and yields nothing.

    ``gathered`` not None (the engine is split like this TP group and PP = 1: ``local_sync``): each TP-split
    parameter is fed from this rank's own shard alone, as a full-shaped HF tensor whose other ranks' parts are
    left unset (the engine reads only its own part): no gather; but the parameters named in ``gathered`` (the
    engine holds them otherwise split, or whole) are gathered as usual."""
    stats = SyncStats() if stats is None else stats
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else [dist.get_rank()]
    state = _local_state(model)
    mapping.check_rank_names(state, mapping.params(dims, pp_rank, pp_size), f"weight sync, pp stage {pp_rank}")
    device = next(iter(state.values())).device
    pack = keep or pp_size > 1  # a lone TP rank without an engine only joins the all-gathers

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    def gather(p: mapping.Param) -> dict[str, torch.Tensor]:
        shard = state[p.mcore].detach()
        if p.kind == mapping.REPLICATED or tp_size == 1:
            return mapping.merge(p, [shard] * tp_size)
        if gathered is not None and p.mcore not in gathered:
            stats.local += 1
            return mapping.merge(p, [shard if r == tp_rank else torch.empty_like(shard) for r in range(tp_size)])
        shards = [torch.empty_like(shard) for _ in range(tp_size)]
        dist.all_gather(shards, shard.contiguous(), group=tp_group)
        stats.collectives += 1
        stats.bytes_sent += shard.nbytes * (tp_size - 1)
        stats.bytes_received += shard.nbytes * (tp_size - 1)
        return mapping.merge(p, shards)

    for stage in range(pp_size):
        pending: dict[str, torch.Tensor] = {}  # merged HF tensors of the parameter being gathered, not yet packed
        for bucket in bucket_plan(dims, stage, pp_size, dtype, bucket_bytes):
            numel = bucket[-1].offset + bucket[-1].numel
            flat = torch.empty(numel, dtype=dtype, device=device) if pack else None
            for slot in bucket:
                if stage == pp_rank:
                    if slot.name not in pending:
                        pending = gather(slot.param)
                    tensor = pending.pop(slot.name)
                    if flat is not None:
                        flat[slot.offset:slot.offset + slot.numel].view(slot.shape).copy_(tensor)
                    del tensor
            if pp_size > 1:
                dist.broadcast(flat, src=pp_ranks[stage], group=pp_group)
                stats.collectives += 1
                if stage == pp_rank:
                    stats.bytes_sent += flat.nbytes * (pp_size - 1)
                else:
                    stats.bytes_received += flat.nbytes
            if not keep:
                del flat
                continue
            size = numel * flat.element_size()
            stats.buckets += 1
            stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, size)
            stats.tensors += len(bucket)
            stats.bytes += size
            views = collections.deque((s.name, flat[s.offset:s.offset + s.numel].view(s.shape)) for s in bucket)
            name, last = views.pop()
            last = last.clone()  # what the engine holds while the next bucket fills: this tensor, not the bucket
            del flat  # the views keep the buffer alive until the engine has dropped the last of them
            while views:
                yield views.popleft()
            yield name, last
            del last


def local_sync(engine, dims: mapping.Dims, tp_size: int, pp_size: int) -> frozenset | None:
    """Whether ``engine`` can be fed from this rank's own shards (see ``gathered_hf_tensors``): None when not (its
    tensor parallelism differs from this TP group's, PP > 1, or it holds whole tensors), else the Megatron names
    that must still be gathered: the vocabulary-split ones unless its vocabulary shards are megatron's
    (``engine.vocab_range``: vLLM pads the vocabulary to a multiple of 64 before splitting it), and the vision
    tower when the engine runs it whole (``engine.vision_data_parallel``)."""
    engine_tp = getattr(engine, "tensor_parallel", 1)
    if engine is None or tp_size == 1 or engine_tp != tp_size or pp_size != 1:
        return None
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    per = dims.vocab // tp_size
    names = {p.mcore for p in mapping.params(dims, 0, 1)}
    out = set()
    if tuple(engine.vocab_range()) != (tp_rank * per, (tp_rank + 1) * per):
        out |= {"language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"}
    if getattr(engine, "vision_data_parallel", False):
        out |= {n for n in names if n.startswith("vision.")}
    return frozenset(out & names)


def sync_weights(model: torch.nn.Module, hf_config, engine=None, dtype: torch.dtype = torch.bfloat16,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """Push this policy's weights into ``engine`` (on ranks that hold one); collective over TP and PP.

    ``model`` is the unwrapped ``Qwen2_5_VLModel`` of this rank; ``dtype`` is the engine's weight dtype. An engine
    split like the TP group (vLLM at ``rollout.tensor_parallel`` = TP, PP = 1) is fed from this rank's own shards
    without gathers (``local_sync``). Returns the sync's ``SyncStats`` (the time is also logged; tensors, bytes
    and buckets count on engine ranks only, collectives and bytes sent / received on every rank).
    """
    dims = mapping.Dims.from_hf_config(hf_config)
    bucket_bytes = effective_bucket_bytes(dims, dtype, bucket_bytes)
    stats = SyncStats()
    start = time.perf_counter()
    gathered = local_sync(engine, dims, parallel_state.get_tensor_model_parallel_world_size(),
                          parallel_state.get_pipeline_model_parallel_world_size())
    with torch.no_grad():
        stream = gathered_hf_tensors(model, dims, dtype, bucket_bytes, stats, keep=engine is not None,
                                     gathered=gathered)
        if engine is not None:
            engine.update_weights(stream)
        collections.deque(stream, maxlen=0)  # whatever is left: every rank runs every collective
    stats.seconds = time.perf_counter() - start
    log.debug("weight sync: %d tensors, %.1f MB in %d buckets (largest %.1f MB), %d collectives, %.1f MB sent, "
              "%.1f MB received, %d parameters from the local shard, in %.3f s", stats.tensors, stats.bytes / 2**20,
              stats.buckets, stats.peak_bucket_bytes / 2**20, stats.collectives, stats.bytes_sent / 2**20,
              stats.bytes_received / 2**20, stats.local, stats.seconds)
    return stats
