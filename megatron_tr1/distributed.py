"""Process groups and seeds: torch.distributed (nccl on GPU, gloo on CPU) + megatron ``parallel_state``.

``init_parallel(tp, pp, seed)`` reads the usual launcher environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; set by torchrun and SLURM scripts) unless the default
group already exists (e.g. under ``run_ranks``), builds megatron's TP / PP / DP groups and seeds every RNG
like ``model_parallel_cuda_manual_seed``. On a machine without CUDA it enables the CPU stand-in
(``megatron_tr1.testing.cpu``) first, so the same call works in tests and the CPU demo.
"""
from __future__ import annotations

import os
import random
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_tr1.errors import ConfigError


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 1800) -> None:
    """Initialise torch.distributed (if needed), megatron parallel state for TP x PP (x DP) and seeds."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        from megatron_tr1.testing.cpu import enable_cpu_megatron
        enable_cpu_megatron()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ConfigError(f"parallel.tensor_parallel={tp} x parallel.pipeline_parallel={pp} must divide the "
                          f"world size {world}")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, torch and megatron's model-parallel RNG tracker (distinct per TP rank, per PP stage)."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def teardown() -> None:
    """Destroy megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
