"""Vocab-parallel log-probs at TP=2 (gloo): each rank's shard gives the unsharded values and gradients."""
import torch
import torch.distributed as dist

import kernels
from kernel_checks import assert_close, labels_for, linear_and_grads, logits_for, logprobs_and_grads
from kernels import reference
from kernels._dispatch import use_triton
from megatron_tr1.launch import run_ranks

N, H, V_LOCAL = 23, 8, 1009  # prime shard size; labels fall in both shards, plus ignored rows


def _inputs():
    v = 2 * V_LOCAL
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(v, H, generator=g)
    return logits_for(N, v).float(), hidden, weight, labels_for(N, v)


def _plain(results):
    """Tensors as nested lists: tensors sent through the result queue would be shared-memory handles that die
    with the rank."""
    return {k: v if isinstance(v, bool) else [t.tolist() for t in v] for k, v in results.items()}


def _rank(rank, world_size):
    group = dist.group.WORLD
    logits, hidden, weight, labels = _inputs()
    shard = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    return _plain({
        "triton": use_triton("fused_logprobs", logits),
        "logprobs": logprobs_and_grads(kernels.fused_logprobs, logits[:, shard].contiguous(), labels, 0.9,
                                       tp_group=group),
        "linear": linear_and_grads(kernels.fused_linear_logprobs, hidden, weight[shard], labels, tp_group=group,
                                   chunk_size=400),
        "reference_logprobs": logprobs_and_grads(reference.fused_logprobs, logits[:, shard].contiguous(), labels,
                                                 0.9, tp_group=group),
        "reference_linear": linear_and_grads(reference.fused_linear_logprobs, hidden, weight[shard], labels,
                                             tp_group=group),
    })


def test_tp2_shards_equal_unsharded():
    results = run_ranks(_rank, 2)
    logits, hidden, weight, labels = _inputs()
    lp, ent, grad = logprobs_and_grads(reference.fused_logprobs, logits.double(), labels, 0.9)
    lin_lp, lin_ent, grad_h, grad_w = linear_and_grads(reference.fused_linear_logprobs, hidden.double(),
                                                       weight.double(), labels)
    for rank, res in enumerate(results):
        assert res["triton"]
        shard = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
        for key in ("logprobs", "reference_logprobs"):
            r_lp, r_ent, r_grad = map(torch.tensor, res[key])
            assert_close(r_lp, lp)
            assert_close(r_ent, ent)
            assert_close(r_grad, grad[:, shard])
        for key in ("linear", "reference_linear"):
            r_lp, r_ent, r_gh, r_gw = map(torch.tensor, res[key])
            assert_close(r_lp, lin_lp)
            assert_close(r_ent, lin_ent)
            assert_close(r_gh, grad_h)  # summed over the group inside backward
            assert_close(r_gw, grad_w[shard])
