"""Per-rank bodies of the optimizer-step tests (importable by spawned ranks) and their HF reference.

Each case builds the tiny HF model and the matching megatron model (weights through the conversion
mapping), wraps it with ``wrap_ddp_and_optimizer`` (megatron DDP + Adam), takes one step of a mean
cross-entropy loss and returns the updated parameters mapped back to HF names by ``convert.mapping``,
megatron's global grad norm, and the same step done by ``torch.optim.AdamW`` + ``clip_grad_norm_`` on HF.
"""
import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads

from megatron_tr1.testing.reference import mcore_to_hf_state
from megatron_tr1.distributed import init_parallel, wrap_ddp_and_optimizer
from megatron_tr1.models.qwen2_5_vl import get_rope_index
from megatron_tr1.demo import tiny_hf_model
from megatron_tr1.testing.tiny_model import hf_logits, tiny_mcore_model, tiny_video_batch

from _parallel_cases import max_diff, mcore_logits, mean_ce

LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 0.1, (0.9, 0.999), 1e-8


def batch(config, seed: int) -> dict:
    """``tiny_video_batch(seed)`` (different prompts and pixels per seed) with 3-D positions and next-token
    labels (-100 at the end and at padding: a padded query row's output is implementation-defined)."""
    b = tiny_video_batch(config, seed=seed)
    b["position_ids"] = get_rope_index(config, b["input_ids"], b["attention_mask"], video_grid_thw=b["video_grid_thw"],
                                       second_per_grid_ts=b["second_per_grid_ts"])
    labels = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
    b["labels"] = torch.cat([labels, torch.full_like(labels[:, :1], -100)], 1).masked_fill(b["attention_mask"] == 0, -100)
    return b


def hf_disk_name(name: str) -> str:
    """In-memory HF parameter name -> on-disk name (the names ``convert.mapping`` yields)."""
    for mem, disk in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(mem):
            return disk + name[len(mem):]
    return name


def hf_reference_step(hf, batches: list, grad_clip: float):
    """One AdamW step on HF with the gradient of the mean loss over ``batches`` (= the DP-averaged one).

    Weight decay skips biases and 1-D tensors, as megatron does. Returns the clipped model and the total
    grad norm before clipping.
    """
    hf.zero_grad()
    (sum(mean_ce(hf_logits(hf, b, b["position_ids"]), b["labels"]) for b in batches) / len(batches)).backward()
    norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), grad_clip).item()
    decay = [p for n, p in hf.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in hf.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=LR, betas=BETAS, eps=EPS).step()
    return hf, norm


def numpy_params(named) -> dict:
    return {n: p.detach().numpy().copy() for n, p in named}


def megatron_step(rank, tp, tie, grad_clip, use_distributed_optimizer, batch_seed):
    """Build, wrap and step the megatron model; return it and the step's outputs."""
    init_parallel(tp, 1)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    (ddp,), optimizer = wrap_ddp_and_optimizer([tiny_mcore_model(hf).train()], LR, WEIGHT_DECAY, grad_clip,
                                               use_distributed_optimizer, adam_beta1=BETAS[0],
                                               adam_beta2=BETAS[1], adam_eps=EPS)
    b = batch(hf.config, batch_seed)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    mean_ce(mcore_logits(ddp, b), b["labels"]).backward()
    finalize_model_grads([ddp])
    update_ok, grad_norm, _ = optimizer.step()
    out = {"update_ok": update_ok, "grad_norm": grad_norm,
           "params": {(ps.get_tensor_model_parallel_rank(), 0): numpy_params(ddp.module.named_parameters())}}
    return hf, ddp, out


def dp_case(rank, world, use_distributed_optimizer):
    """DP=world: each rank steps on its own batch; rank 0 also returns the HF reference on all batches."""
    hf, _, out = megatron_step(rank, 1, False, 1.0, use_distributed_optimizer, batch_seed=rank)
    if rank == 0:
        ref, out["hf_grad_norm"] = hf_reference_step(tiny_hf_model(0), [batch(hf.config, r) for r in range(world)], 1.0)
        out["hf_params"] = {hf_disk_name(n): p for n, p in numpy_params(ref.named_parameters()).items()}
        out["hf_initial"] = {hf_disk_name(n): p for n, p in numpy_params(hf.named_parameters()).items()}
    return out


def tp_case(rank, world, use_distributed_optimizer, grad_clip):
    """TP=world (tied embeddings), one clipped step on the same batch; logits after the step vs HF's."""
    hf, ddp, out = megatron_step(rank, world, True, grad_clip, use_distributed_optimizer, batch_seed=0)
    b = batch(hf.config, 1)  # fresh data
    with torch.no_grad():
        before = hf_logits(hf, b, b["position_ids"])
    ref, out["hf_grad_norm"] = hf_reference_step(hf, [batch(hf.config, 0)], grad_clip)
    with torch.no_grad():
        out["logits_change"] = max_diff(hf_logits(ref, b, b["position_ids"]), before, b)
        out["logits_diff"] = max_diff(mcore_logits(ddp.eval(), b), hf_logits(ref, b, b["position_ids"]), b)
    if rank == 0:
        out["hf_params"] = {hf_disk_name(n): p for n, p in numpy_params(ref.named_parameters()).items()}
    return out


def two_rank_suite(rank, world):
    """Every two-rank case, in one pair of processes (process start-up dominates the test time)."""
    return {"dp2_distopt": dp_case(rank, world, True), "dp2_plain": dp_case(rank, world, False),
            "tp2_plain": tp_case(rank, world, False, 1.0), "tp2_distopt": tp_case(rank, world, True, 1.0)}


def mapped(rank_params: dict, config, tp: int) -> dict:
    """Merge the ranks' megatron parameters and map them to HF names (``convert.mapping``)."""
    states = {k: {n: torch.from_numpy(a) for n, a in v.items()} for k, v in rank_params.items()}
    return {n: t.numpy() for n, t in mcore_to_hf_state(states, config, tp, 1)}
