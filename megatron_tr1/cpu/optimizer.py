"""The CPU stand-in for megatron-core's DDP + optimizer (megatron-core 0.16.1); applied by ``enable_cpu_megatron``.

Covers ``DistributedDataParallel`` (grad buffers, overlap off) and ``get_megatron_optimizer`` (Adam, fp32,
with or without the distributed optimizer, ``clip_grad``). Without apex / Transformer Engine megatron
already falls back to ``torch.optim.Adam`` and to the pure-torch ``local_multi_tensor_*`` helpers; what is
left are ``device='cuda'`` literals and ``param.type() == 'torch.cuda.FloatTensor'`` checks. Nothing is
needed in ``distributed/param_and_grad_buffer.py``: its only literal (``device="cuda"``) is on the NCCL
user-buffer path, its ``torch.cuda.current_device()`` calls are covered by ``megatron.py`` patch 1, and its
streams are used only with ``overlap_grad_reduce``. Not covered: the optimizer-state checkpoint gather
with ``use_gloo_comm=False`` (``send_tensor.cuda()`` in ``DistributedOptimizer.get_parameter_state_dp_zero``;
the default ``use_gloo_comm=True`` already stays on CPU) and CPU-offloaded optimizer states.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_TENSOR_TYPE = torch.Tensor.type


def _type_as_if_on_cuda(tensor, *args, **kwargs):
    """``Tensor.type()`` that names a CPU tensor's type as its CUDA twin ("torch.FloatTensor" ->
    "torch.cuda.FloatTensor"); a conversion call (``tensor.type(dtype)``) is unchanged."""
    name = _TENSOR_TYPE(tensor, *args, **kwargs)
    if args or kwargs or not isinstance(name, str) or name.startswith("torch.cuda."):
        return name
    return "torch.cuda." + name[len("torch."):]


@contextlib.contextmanager
def _cpu_tensors_typed_as_cuda():
    torch.Tensor.type = _type_as_if_on_cuda
    try:
        yield
    finally:
        torch.Tensor.type = _TENSOR_TYPE


def _typed_as_cuda_during(fn):
    """``fn`` with CPU tensors reporting CUDA type names for the duration of the call only."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_typed_as_cuda():
            return fn(*args, **kwargs)
    return wrapper


def _l2_norm_on_cpu(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``megatron.core.utils.local_multi_tensor_l2_norm`` (the apex-free fallback) without its
    ``device="cuda"`` result: the fp32 norm over every tensor of every list, shape ``[1]``."""
    norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def patch_ddp_and_optimizer(torch_with_cpu_defaults) -> None:
    """Apply the patches (called once, by ``enable_cpu_megatron``, only when CUDA is unavailable)."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    # 7. `device='cuda'` literals: the optimizers' found-inf / overflow / unit-scale scalars
    #    (MixedPrecisionOptimizer, FP32Optimizer) and the grad-norm / clip scratch tensors in
    #    clip_grads.py. Each module's own `torch` name becomes the view that maps them to CPU.
    for module in (mcore_optimizer, distrib_optimizer, clip_grads):
        module.torch = torch_with_cpu_defaults

    # 8. Without apex, clip_grads.py computes the grad norm with megatron.core.utils'
    #    `local_multi_tensor_l2_norm`, which returns its result on "cuda". Only that fallback is replaced.
    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm_on_cpu

    # 9. The optimizers sort parameters by `param.type()` ('torch.cuda.FloatTensor' / Half / BFloat16)
    #    when they are built and raise TypeError for anything else, and clipping asserts
    #    `grad.type() == 'torch.cuda.FloatTensor'`. During exactly those calls a CPU tensor reports its
    #    CUDA twin's type name. (optimizer.py imported the clip function by name, so it is wrapped there.)
    for cls in (distrib_optimizer.DistributedOptimizer, mcore_optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _typed_as_cuda_during(cls.__init__)
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _typed_as_cuda_during(mcore_optimizer.clip_grad_by_total_norm_fp32)

    # 10. With one data-parallel rank, the distributed optimizer's parameter all-gather copies each bucket
    #     onto itself. gloo runs that copy on its worker thread, where a parallel copy starts a second OpenMP
    #     team that outlives it; from then on every op of the training thread is slower (measured on the
    #     2-core CI machine: an SFT forward+backward went from 0.2 s to 0.4 s after the first optimizer
    #     step). The self-copy is skipped; with more than one rank the gather runs unchanged.
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    start_param_sync = _ParamAndGradBucketGroup.start_param_sync

    @functools.wraps(start_param_sync)
    def start_param_sync_unless_alone(self, force_sync: bool = False):
        if self.intra_distributed_optimizer_instance_size == 1 and self.param_gather_handle is None:
            self.param_gather_dispatched = True
            return None
        return start_param_sync(self, force_sync)
    _ParamAndGradBucketGroup.start_param_sync = start_param_sync_unless_alone
