"""kernels.fused_logprobs (Triton, interpreted) against the float64 reference: values, entropy, gradients."""
import pytest
import torch

import kernels
from kernel_checks import IGNORE, assert_close, labels_for, logits_for, logprobs_and_grads as run
from kernels import reference

N, V = 37, 5003  # N fits no block size; V is prime and > the 4096 vocab block: one full block + a ragged tail


@pytest.mark.parametrize("dtype,temperature,use_entropy", [
    (torch.float32, 1.0, False),
    (torch.float32, 0.7, True),
    (torch.bfloat16, 0.7, True),
    (torch.float16, 1.3, True),
])
def test_matches_float64_reference(dtype, temperature, use_entropy):
    logits, labels = logits_for(N, V).to(dtype), labels_for(N, V)
    lp, ent, grad = run(kernels.fused_logprobs, logits, labels, temperature, use_entropy)
    lp_ref, ent_ref, grad_ref = run(reference.fused_logprobs, logits.double(), labels, temperature, use_entropy)
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    assert_close(lp, lp_ref)
    assert_close(ent, ent_ref)
    assert_close(grad, grad_ref, dtype)
    ignored = labels == IGNORE
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert (lp[~ignored] < 0).all() and (grad[~ignored] != 0).any(dim=1).all()


def test_strided_and_batched_logits():
    base = logits_for(2 * 11, V).float()
    rows = base[::2]  # row stride 2V, used in place
    batched = base.view(2, 11, V)[:, :-1]  # [B, T-1, V] view: flattened with a copy
    for logits in (rows, batched):
        labels = labels_for(logits[..., 0].numel(), V).view(logits.shape[:-1])
        lp, ent, grad = run(kernels.fused_logprobs, logits, labels, 0.9)
        lp_ref, ent_ref, grad_ref = run(reference.fused_logprobs, logits.double(), labels, 0.9)
        assert lp.shape == labels.shape and grad.shape == logits.shape
        assert_close(lp, lp_ref)
        assert_close(ent, ent_ref)
        assert_close(grad, grad_ref)


def test_saves_only_the_logits_and_row_statistics():
    logits, labels = logits_for(N, V).float().requires_grad_(), labels_for(N, V)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.fused_logprobs(logits, labels, return_entropy=True)
    big = [t for t in saved if t.numel() >= N]
    assert [t.data_ptr() for t in big if t.numel() >= N * V] == [logits.data_ptr()]  # by reference, no copy
    assert all(t.numel() == N for t in big if t.numel() < N * V)  # labels, lse, entropy


def test_no_grad_matches_reference():
    logits, labels = logits_for(N, V).bfloat16(), labels_for(N, V)
    with torch.no_grad():
        lp = kernels.fused_logprobs(logits, labels, 0.7)
    assert not lp.requires_grad
    assert_close(lp, reference.fused_logprobs(logits.double(), labels, 0.7))
