"""``enable_cpu_megatron`` is idempotent, makes megatron's CUDA-only helpers work on CPU, and is a no-op
(touching nothing) where CUDA is available."""
import subprocess
import sys

import torch

from megatron_tr1.cpu import enable_cpu_megatron


def test_enable_cpu_megatron_is_idempotent_and_redirects_cuda_calls():
    assert enable_cpu_megatron() is True
    assert enable_cpu_megatron() is True
    from megatron.core.fusions.fused_softmax import get_default_causal_mask
    from megatron.core.tensor_parallel import random as tp_random

    assert torch.cuda.current_device() == "cpu"
    assert get_default_causal_mask(3).device.type == "cpu"
    assert torch.equal(get_default_causal_mask(3), torch.triu(torch.ones(3, 3, dtype=torch.bool), 1))
    tracker = tp_random.CudaRNGStatesTracker()
    tracker.add("x", 7)
    with tracker.fork("x"):
        a = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(2))  # the forked state is the CPU generator seeded with 7


def test_optimizer_patches_are_scoped():
    enable_cpu_megatron()
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    # device='cuda' literals land on CPU inside the optimizer modules only
    assert clip_grads.torch.zeros(1, device="cuda").device.type == "cpu"
    assert torch.zeros(1).device.type == "cpu" and torch.zeros is not clip_grads.torch.zeros
    # the apex-free grad norm runs on CPU (and is the plain L2 norm)
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, None, [grads], False)
    assert norm.device.type == "cpu" and norm.item() == 5.0
    # clipping sees CUDA type names only during the call; Tensor.type is itself again afterwards
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 2.0)
    mcore_optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((2,), 0.5), rtol=1e-5)
    assert p.type() == "torch.FloatTensor" and p.type(torch.float64).dtype == torch.float64


def test_enable_cpu_megatron_is_a_no_op_with_cuda():
    """On a CUDA machine nothing is patched (checked in a fresh process that reports CUDA as available)."""
    code = """
import torch
torch.cuda.is_available = lambda: True
current_device, tensor_type = torch.cuda.current_device, torch.Tensor.type
from megatron.core.optimizer import clip_grads, distrib_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.transformer import utils
init, mask = distrib_optimizer.DistributedOptimizer.__init__, utils.get_default_causal_mask
from megatron_tr1.cpu import enable_cpu_megatron
assert enable_cpu_megatron() is False and enable_cpu_megatron() is False
assert torch.cuda.current_device is current_device and torch.Tensor.type is tensor_type
assert clip_grads.torch is torch and mcore_optimizer.torch is torch and distrib_optimizer.torch is torch
assert distrib_optimizer.DistributedOptimizer.__init__ is init and utils.get_default_causal_mask is mask
"""
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
