"""Process groups and seeds: torch.distributed (the backend's: nccl on GPU, gloo on CPU) + megatron ``parallel_state``.

``init_parallel(tp, pp, seed, backend=...)`` reads the usual launcher environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; set by torchrun and SLURM scripts) unless the default
group already exists (e.g. under ``launch.run_ranks``), builds megatron's TP / PP / DP groups and seeds every
RNG like ``model_parallel_cuda_manual_seed``. The ``backend.Backend`` (default: ``backend.resolve()``) picks the
device and process-group backend; on a machine without CUDA resolving it enables megatron-core's CPU stand-in,
so the same call works in tests and the CPU demo. Returns the backend.

``wrap_ddp_and_optimizer(model_chunks, lr, weight_decay, grad_clip)`` wraps the chunks in megatron's
``DistributedDataParallel`` and builds megatron's optimizer (Adam, optionally the distributed optimizer).
"""
from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_tr1.backend import Backend, resolve
from megatron_tr1.errors import ConfigError


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 1800,
                  backend: Backend | None = None) -> Backend:
    """Initialise torch.distributed (if needed), megatron parallel state for TP x PP (x DP) and seeds; returns
    the backend used (``backend``, or ``backend.resolve()``)."""
    backend = backend or resolve()
    if not dist.is_initialized():
        if backend.cuda:
            torch.cuda.set_device(backend.device)
        dist.init_process_group(backend.dist_backend, timeout=timedelta(seconds=timeout_s))
    elif backend.cuda:
        torch.cuda.set_device(backend.device)
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ConfigError(f"model.tensor_parallel={tp} x model.pipeline_parallel={pp} must divide the world size "
                          f"{world}")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)
    return backend


def seed_everything(seed: int) -> None:
    """Seed Python, torch and megatron's model-parallel RNG tracker (distinct per TP rank, per PP stage)."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def single_process_env() -> None:
    """The launcher variables torchrun would set, for a plain one-process run (no-op when ``RANK`` is set)."""
    if "RANK" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def is_rank0() -> bool:
    """Global rank 0, or no process group at all."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when there is more than one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_ddp_and_optimizer(model_chunks, lr: float, weight_decay: float, grad_clip: float,
                           use_distributed_optimizer: bool = True, **optimizer_config):
    """Megatron ``DistributedDataParallel`` around each model chunk + ``get_megatron_optimizer`` (Adam).

    Call after ``init_parallel`` (which sets up the backend, and on CPU megatron's stand-in) with this rank's
    chunks (a list; one per virtual pipeline stage, or one).
    Precision follows the model: bf16 parameters (the GPU build) get bf16 mixed precision with fp32 main
    parameters and fp32 grad reduction; fp32 parameters (the CPU build) give a plain fp32 optimizer.
    DDP uses contiguous grad buffers with overlap off and averages gradients over the data-parallel
    group; replicas are synchronised from DP rank 0 once here. Adam is AdamW (decoupled weight decay,
    betas (0.9, 0.999), eps 1e-8 unless ``optimizer_config`` overrides ``OptimizerConfig`` fields);
    biases and 1-D parameters (norms) get no weight decay, as in megatron. ``grad_clip`` is the max
    global L2 norm over all TP / PP / DP shards (0 disables clipping). The learning rate and weight decay
    are written into the param groups here, so the optimizer is correct without megatron's
    ``OptimizerParamScheduler`` (one, if used, overwrites them each step).

    One step::

        for chunk in ddp_chunks: chunk.zero_grad_buffer()
        optimizer.zero_grad()
        ...forward/backward (or a megatron pipeline schedule) on ddp_chunks...
        finalize_model_grads(ddp_chunks)  # megatron.core.distributed: DP reduce (+ tied-embedding grads)
        update_ok, grad_norm, _ = optimizer.step()

    Returns ``(ddp_chunks, optimizer)``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_chunks = list(model_chunks)
    config = model_chunks[0].config
    if config.fp16:
        raise ConfigError("wrap_ddp_and_optimizer: fp16 parameters need a loss scaler, which is not set up; "
                          "build the model with params_dtype=torch.bfloat16 (GPU) or torch.float32")
    if config.bf16 and next(model_chunks[0].parameters()).device.type != "cuda":
        raise ConfigError("wrap_ddp_and_optimizer: bf16 parameters off the GPU; the CPU path is fp32 only: build "
                          "the model with params_dtype=torch.float32")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=use_distributed_optimizer)
    ddp_chunks = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                          disable_bucketing=i > 0) for i, chunk in enumerate(model_chunks)]
    for chunk in ddp_chunks:
        chunk.broadcast_params()
    optimizer = get_megatron_optimizer(
        OptimizerConfig(**{"optimizer": "adam", "lr": lr, "min_lr": lr, "weight_decay": weight_decay,
                           "clip_grad": grad_clip, "bf16": config.bf16, "params_dtype": config.params_dtype,
                           "use_distributed_optimizer": use_distributed_optimizer, **optimizer_config}),
        ddp_chunks)
    for group in optimizer.param_groups:  # what OptimizerParamScheduler would set at a constant lr
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
    return ddp_chunks, optimizer
