"""Plain-PyTorch twins of the kernels: the tests' ground truth and the fallback where Triton cannot run.

Same signatures and return conventions as the public functions in ``kernels``. They materialise full-size
intermediates (float32 logits, softmax) and rely on autograd; float64 inputs stay float64 (the tests use that).
The GRPO pieces follow verl's ``compute_policy_loss_vanilla`` / ``compute_policy_loss_gspo``, ``kl_penalty`` and
``agg_loss``; CISPO and the rollout corrections (TIS / MIS / seq-MIS) are written from their definitions in
``kernels.grpo_loss``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
KL_TYPES = ("k1", "k2", "low_var_kl")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOSS_TYPES = ("grpo", "gspo", "cispo")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "seq-mis")
GSPO_LOG_RATIO_MAX = 10.0  # verl clamps GSPO's per-token log-ratio at this maximum


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every rank holds the same combined value."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce (sum) backward: an input replicated across the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _reduce(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ReduceFromGroup.apply(x, group)


def vocab_range(v_local: int, group) -> tuple[int, int]:
    """[start, end) of this rank's contiguous vocab shard (all shards have ``v_local`` entries)."""
    rank = 0 if group is None else dist.get_rank(group)
    return rank * v_local, (rank + 1) * v_local


def fused_logprobs(logits, labels, temperature=1.0, *, tp_group=None, return_entropy=False,
                   ignore_index=IGNORE_INDEX):
    """log p(label) of ``logits / temperature`` per row (and the entropy), vocab-parallel over ``tp_group``.

    ``logits`` [..., V_local], ``labels`` [...] global ids; rows labelled ``ignore_index`` give 0 (and entropy
    0). Returns float32 (float64 for float64 logits) of shape ``labels.shape``.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature
    start, end = vocab_range(z.shape[-1], tp_group)
    m = z.detach().amax(-1)
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m.unsqueeze(-1))
    s = _reduce(e.sum(-1), tp_group)
    lse = m + torch.log(s)
    ignored = labels == ignore_index
    in_shard = (labels >= start) & (labels < end) & ~ignored
    local = torch.where(in_shard, labels - start, 0)
    target = torch.where(in_shard, z.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
    logprobs = torch.where(ignored, 0.0, _reduce(target, tp_group) - lse)
    if not return_entropy:
        return logprobs
    mean_z = _reduce((e * z).sum(-1), tp_group) / s
    entropy = torch.where(ignored, 0.0, lse - mean_z)
    return logprobs, entropy


def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, *, tp_group=None, return_entropy=False,
                          chunk_size=None, ignore_index=IGNORE_INDEX):
    """``fused_logprobs(hidden @ weight.T, ...)``; ``weight`` is this rank's vocab shard [V_local, H].

    ``hidden`` is replicated across ``tp_group``; its gradient is summed over the group (as the column-parallel
    LM head does). ``chunk_size`` is accepted for signature parity and ignored.
    """
    if tp_group is not None:
        hidden = _CopyToGroup.apply(hidden, tp_group)
    return fused_logprobs(hidden @ weight.T, labels, temperature, tp_group=tp_group,
                          return_entropy=return_entropy, ignore_index=ignore_index)


def kl_penalty(logprobs, ref_logprobs, kl_type):
    """Per-token KL estimate of the policy against the reference, as verl's ``kl_penalty``."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kl_type == "low_var_kl":
        kl = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
        return torch.clamp(torch.exp(kl) - kl - 1, -10.0, 10.0)
    raise ValueError(f"kl_type={kl_type!r}: expected one of {KL_TYPES}")


def agg_loss(loss_mat, mask, agg, norm_len=None):
    """Masked aggregation of a [B, T] loss as verl's ``agg_loss`` (denominators clamped at 1, not +1e-8).

    ``seq-mean-token-mean`` averages over sequences with at least one unmasked token; ``seq-mean-token-sum`` over
    all B sequences; ``seq-mean-token-sum-norm`` (Dr. GRPO) is ``seq-mean-token-sum`` divided by the constant
    ``norm_len`` (default T; the trainer passes ``rollout.max_tokens``).
    """
    mask = mask.to(loss_mat.dtype)
    if agg == "token-mean":
        return (loss_mat * mask).sum() / mask.sum().clamp(min=1)
    seq_sum = (loss_mat * mask).sum(-1)
    if agg == "seq-mean-token-sum":
        return seq_sum.mean()
    if agg == "seq-mean-token-sum-norm":
        return seq_sum.mean() / (loss_mat.shape[-1] if norm_len is None else norm_len)
    if agg == "seq-mean-token-mean":
        count = mask.sum(-1)
        return (seq_sum / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    raise ValueError(f"agg={agg!r}: expected one of {AGG_MODES}")


def rollout_keep(old_logprobs, rollout_logprobs, mask, correction, cap):
    """The loss mask after masked importance sampling: ``mis`` drops tokens whose ``exp(old - rollout)`` lies
    outside ``[1 / cap, cap]``; ``seq-mis`` drops whole sequences whose geometric-mean ratio (the exp of the
    masked mean of ``old - rollout``) does; other corrections keep ``mask`` as it is."""
    mask = mask.to(old_logprobs.dtype)
    if correction not in ("mis", "seq-mis"):
        return mask
    bound = torch.log(torch.tensor(float(cap), dtype=torch.float64)).item()
    d = (old_logprobs - rollout_logprobs).detach()
    if correction == "mis":
        return mask * (d.abs() <= bound).to(mask.dtype)
    seq = (d * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return mask * (seq.abs() <= bound).to(mask.dtype).unsqueeze(-1)


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
              clip_dual=None, kl_coef=0.0, kl_type="low_var_kl", entropy=None, entropy_coef=0.0,
              agg="token-mean", loss_type="grpo", rollout_logprobs=None, rollout_correction="none",
              rollout_cap=2.0, agg_norm_len=None):
    """GRPO / GSPO / CISPO loss of ``[B, T]`` token log-probs; returns ``(loss, stats)``. See ``kernels.grpo_loss``."""
    given = mask.to(logprobs.dtype)
    mask = given if rollout_logprobs is None else rollout_keep(old_logprobs, rollout_logprobs, given,
                                                               rollout_correction, rollout_cap)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(-1).expand_as(logprobs) if adv.dim() == 1 else adv
    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped_dual = torch.zeros_like(ratio, dtype=torch.bool)
    if loss_type == "gspo":  # verl's compute_policy_loss_gspo: one ratio per sequence, token-level gradients
        seq = ((logprobs - old_logprobs).detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = torch.exp(torch.clamp(logprobs - logprobs.detach() + seq.unsqueeze(-1), max=GSPO_LOG_RATIO_MAX))
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        pg = torch.maximum(pg1, pg2)
        clipped = pg2 > pg1
    elif loss_type == "cispo":  # the clipped ratio, detached, weighs the REINFORCE term
        pg = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high).detach() * adv * logprobs
        clipped = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
    else:
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        pg = torch.maximum(pg1, pg2)
        clipped = pg2 > pg1
        if clip_dual is not None:
            pg3 = -adv * clip_dual
            clipped_dual = (pg > pg3) & (adv < 0)
            pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    weight = torch.ones_like(ratio)
    if rollout_correction == "tis":  # truncated importance sampling: the policy-gradient term only
        weight = torch.clamp(torch.exp(old_logprobs - rollout_logprobs), max=rollout_cap).detach()
        pg = pg * weight
    loss = agg_loss(pg, mask, "seq-mean-token-mean" if loss_type == "gspo" else agg, agg_norm_len)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_type)
        loss = loss + kl_coef * agg_loss(kl, mask, agg, agg_norm_len)
    if entropy is not None:
        loss = loss - entropy_coef * agg_loss(entropy, mask, agg, agg_norm_len)

    def mean(x, over=mask):
        return ((x.detach().to(over.dtype) * over).sum() / over.sum().clamp(min=1)).float()

    stats = {"clip_frac": mean(clipped), "clip_frac_dual": mean(clipped_dual), "ppo_kl": mean(-log_ratio),
             "kl": mean(kl), "ratio_mean": mean(ratio), "rc_weight_mean": mean(weight),
             "rc_masked_frac": mean(given - mask, over=given)}
    return loss, stats
