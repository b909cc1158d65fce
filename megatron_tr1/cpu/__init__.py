"""The CPU backend's stand-in for megatron-core's CUDA-only calls (megatron-core 0.16.1).

``megatron.py`` (model, pipeline schedules) and ``optimizer.py`` (DDP, optimizers) redirect the few places
where megatron-core hard-codes CUDA, each patch documented where it is made. ``megatron_tr1.backend`` is the only
importer, and only on a machine without CUDA: the GPU path never loads this package.
"""
from megatron_tr1.cpu.megatron import enable_cpu_megatron

__all__ = ["enable_cpu_megatron"]
