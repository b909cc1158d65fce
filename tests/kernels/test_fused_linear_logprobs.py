"""kernels.fused_linear_logprobs: equal to fused_logprobs on materialised logits, and never [N, V] in memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernel_checks import IGNORE, assert_close, labels_for, linear_and_grads as run
from kernels import reference

N, H, V = 37, 16, 2503  # N > H so that an [N, V] buffer would be the largest tensor around


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, dtype=torch.float64, generator=g)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g) / H ** 0.5 * 3
    return hidden.to(dtype), weight.to(dtype), labels_for(N, V)


def via_logits(hidden, weight, labels, temperature, **kwargs):
    return kernels.fused_logprobs(hidden @ weight.T, labels, temperature, **kwargs)


@pytest.mark.parametrize("dtype,chunk_size", [(torch.float32, 1000), (torch.bfloat16, None)])
def test_equals_fused_logprobs_of_materialised_logits(dtype, chunk_size):
    hidden, weight, labels = inputs(dtype)
    got = run(kernels.fused_linear_logprobs, hidden, weight, labels, chunk_size=chunk_size)
    want = run(via_logits, hidden, weight, labels)
    exact = run(reference.fused_linear_logprobs, hidden.double(), weight.double(), labels)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, dtype, dtype]
    for a, b, c, tol in zip(got, want, exact, (torch.float32, torch.float32, dtype, dtype)):
        assert_close(a, b.double(), dtype if dtype != torch.float32 else tol)
        assert_close(a, c, dtype if dtype != torch.float32 else tol)
    ignored = labels == IGNORE
    assert (got[0][ignored] == 0).all() and (got[2][ignored] == 0).all()


def test_batched_hidden_and_no_grad():
    hidden, weight, labels = inputs(torch.float32, seed=3)
    with torch.no_grad():
        lp = kernels.fused_linear_logprobs(hidden.view(1, N, H), weight, labels.view(1, N), chunk_size=700)
    assert lp.shape == (1, N)
    assert_close(lp[0], reference.fused_linear_logprobs(hidden.double(), weight.double(), labels))


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op returns (allocations included; the Triton
    interpreter's byte-wise copies of kernel arguments too, hence bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_never_materialises_n_by_v():
    hidden, weight, labels = inputs(torch.float32)
    chunk = 512
    with _LargestTensor() as mode:
        run(kernels.fused_linear_logprobs, hidden, weight, labels, chunk_size=chunk)
    assert mode.largest == V * H * 4  # grad_weight; the logits chunks are N * chunk < V * H < N * V elements
    with _LargestTensor() as mode:
        run(via_logits, hidden, weight, labels)
    assert mode.largest >= N * V * 4  # the check itself sees a materialised [N, V]
