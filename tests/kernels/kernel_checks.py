"""Shared inputs and tolerances for the kernel tests (also imported by their gloo ranks)."""
import torch

IGNORE = -100


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """``actual`` (a kernel output) within a few ulps of ``dtype`` -- times the largest ``|expected|`` -- of the
    float64 ``expected``; 16-bit results get room for a few roundings (logits, gradient, GEMM output), float32
    ones for long float32 sums."""
    eps = torch.finfo(dtype).eps * (4 if dtype in (torch.bfloat16, torch.float16) else 64)
    atol = eps * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=atol)


def labels_for(n: int, v: int, seed: int = 1) -> torch.Tensor:
    """Random labels in [0, v) with the awkward ones pinned: id 0, id v - 1 and two ignored rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0], labels[1], labels[2], labels[-1] = 0, v - 1, IGNORE, IGNORE
    return labels


def logits_for(n: int, v: int, seed: int = 0) -> torch.Tensor:
    """Float64 logits with a spread (std 3) that makes the softmax peaky."""
    return 3.0 * torch.randn(n, v, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def upstream(n: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 upstream gradients for (logprobs, entropy)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)


def logprobs_and_grads(fn, logits, labels, temperature=1.0, use_entropy=True, **kwargs):
    """``fn(logits, labels, ...)`` -> (logprobs, entropy, grad of logits) for a loss weighting both outputs by
    random upstream grads (entropy unused unless ``use_entropy``)."""
    logits = logits.detach().clone().requires_grad_()
    logprobs, entropy = fn(logits, labels, temperature, return_entropy=True, **kwargs)
    g_lp, g_ent = upstream(labels.numel())
    loss = (logprobs.double() * g_lp.view(labels.shape)).sum()
    if use_entropy:
        loss = loss + (entropy.double() * g_ent.view(labels.shape)).sum()
    loss.backward()
    return logprobs.detach(), entropy.detach(), logits.grad


def linear_and_grads(fn, hidden, weight, labels, temperature=0.8, **kwargs):
    """``fn(hidden, weight, labels, ...)`` -> (logprobs, entropy, grad hidden, grad weight), upstream as above."""
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logprobs, entropy = fn(hidden, weight, labels, temperature, return_entropy=True, **kwargs)
    g_lp, g_ent = upstream(labels.numel())
    ((logprobs.double() * g_lp.view(labels.shape)).sum() + (entropy.double() * g_ent.view(labels.shape)).sum()
     ).backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, weight.grad
