"""The CPU stand-in for megatron-core's CUDA-only calls (megatron-core 0.16.1): the CPU backend's model part.

megatron-core runs on CPU with gloo and ``TransformerConfig(use_cpu_initialization=True)`` once the few
places that hard-code CUDA are redirected. ``enable_cpu_megatron()`` does exactly that, once per process
(a second call does nothing). Only ``megatron_tr1.backend.resolve`` calls it, and only on a machine without
CUDA; on a machine with CUDA it refuses (returns False, touches nothing), so it can never change the GPU path.
Each patch below says what it replaces and why; patches 1-6 cover the model and the pipeline schedules, 7-10
(``optimizer.py``) megatron's DDP and optimizers.
"""
from __future__ import annotations

import functools
import types

import torch

_ENABLED = False


class _TorchWithCpuDefaults(types.ModuleType):
    """A view of ``torch`` for one megatron module whose ``device="cuda"`` literals become CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "tensor", "arange", "full"):
            @functools.wraps(attr)
            def on_cpu(*args, **kwargs):
                if str(kwargs.get("device", "cpu")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)
            return on_cpu
        return attr


def _view(module, **overrides) -> types.SimpleNamespace:
    """``module`` with some attributes replaced, to stand in for it inside one megatron module."""
    view = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    view.__dict__.update(overrides)
    return view


@functools.lru_cache(maxsize=32)
def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def enable_cpu_megatron() -> bool:
    """Redirect megatron-core's CUDA-only calls to CPU; True when the CPU stand-in is active.

    Idempotent. With CUDA available it patches nothing and returns False (megatron runs unchanged).
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False

    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils

    # 1. `torch.cuda.current_device()` is used as a device argument all over megatron-core (rotary
    #    frequencies, TP gather buffers). On CPU it raises; "cpu" is a valid device for every such use.
    torch.cuda.current_device = lambda: "cpu"

    # 2. The model-parallel RNG tracker saves/restores the *CUDA* generator state. On CPU the tracked
    #    generator is the CPU default generator (weights are initialised on CPU anyway, dropout is 0).
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    tp_random.torch = _view(torch, cuda=_view(torch.cuda, get_rng_state=torch.get_rng_state,
                                              manual_seed=torch.manual_seed))

    # 3. The default causal mask is built with `device="cuda"`; the softmax imported it by name.
    transformer_utils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask

    # 4. The schedules allocate their token counters with `device="cuda"` literals.
    schedules.torch = _TorchWithCpuDefaults()

    # 5. p2p communication calls `torch.cuda.synchronize()` after batched send/recv; gloo is synchronous.
    p2p_communication.torch = _view(torch, cuda=_view(torch.cuda, synchronize=lambda *args, **kwargs: None))

    # 6. With tied embeddings and PP > 1, the last stage's copy of the embedding is moved with
    #    `weight.data.cuda()` before the first/last-stage all-reduce; during that call `.cuda()` is a no-op.
    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def setup_on_cpu(self, *args, **kwargs):
        cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda tensor, *a, **k: tensor
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda
    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu

    # 7-10. DistributedDataParallel and the optimizers (Adam, clip_grad, distributed optimizer).
    from megatron_tr1.cpu.optimizer import patch_ddp_and_optimizer
    patch_ddp_and_optimizer(_TorchWithCpuDefaults())
    _ENABLED = True
    return True

