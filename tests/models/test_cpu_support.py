"""``enable_cpu_megatron`` is idempotent and makes megatron's CUDA-only helpers work on CPU."""
import torch

from megatron_tr1.testing.cpu import enable_cpu_megatron


def test_enable_cpu_megatron_is_idempotent_and_redirects_cuda_calls():
    enable_cpu_megatron()
    enable_cpu_megatron()
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
