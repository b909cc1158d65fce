"""Per-rank bodies of the multi-rank Qwen3-VL model tests (importable by spawned ranks), and the grad comparison.

Each case builds the tiny HF Qwen3-VL and the matching megatron model on every rank (weights through the
conversion table and the one loader), uses HF's own ``get_rope_index`` positions for both, and returns what the
parent asserts on: max |logit diff| over real tokens, and the parameter gradients of a loss mapped back to HF names.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from _parallel_cases import grads, max_diff, mean_ce, run_1f1b, stage_logits_diff
from megatron_tr1.demo import tiny_qwen3_vl_model
from megatron_tr1.distributed import init_parallel
from megatron_tr1.testing.reference import mcore_to_hf_state
from megatron_tr1.testing.tiny_qwen3_vl import (VISUAL_KEYS, hf_logits, hf_positions, tiny_mcore_qwen3_vl,
                                                tiny_qwen3_vl_batch)

EMBEDDING = "model.language_model.embed_tokens.weight"


def inputs(hf, with_video: bool, with_image: bool = False) -> dict:
    """The tiny batch plus HF's 3-D ``position_ids`` and next-token ``labels`` (-100 at padding and the end)."""
    b = tiny_qwen3_vl_batch(hf.config, with_video=with_video, with_image=with_image)
    b["position_ids"] = hf_positions(hf, b)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, :-1] = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
    labels[b["attention_mask"] == 0] = -100
    b["labels"] = labels
    return b


def visual(b: dict) -> dict:
    return {k: b[k] for k in VISUAL_KEYS if k in b}


def mcore_logits(model, b: dict) -> torch.Tensor:
    return model(b["input_ids"], b["position_ids"], b["attention_mask"], **visual(b))


def hf_grads(hf, loss_fn) -> dict:
    """HF parameter grads of ``loss_fn(hf)`` by name (Qwen3-VL's on-disk names are its in-memory ones)."""
    hf.zero_grad()
    loss_fn(hf).backward()
    return {n: p.grad.numpy().copy() for n, p in hf.named_parameters()}


def compare_grads(rank_grads: dict, config, tp: int, pp: int, ref: dict) -> dict:
    """Max relative grad error per HF tensor (error / max |ref|) after merging the ranks' grads."""
    rank_grads = {k: {n: torch.from_numpy(g) for n, g in v.items()} for k, v in rank_grads.items()}
    ref = {n: torch.from_numpy(g) for n, g in ref.items()}
    ours = dict(mcore_to_hf_state(rank_grads, config, tp, pp))
    if config.tie_word_embeddings and pp > 1:  # megatron's last-stage copy: its grad adds to the embedding's
        copy = torch.cat([rank_grads[t, pp - 1]["language_model.output_layer.weight"] for t in range(tp)])
        ours[EMBEDDING] = ours[EMBEDDING] + copy
    assert ours.keys() == ref.keys() - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return {n: ((ours[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item() for n in ours}


def tp_grads(model) -> dict:
    """``grads(model)`` after summing the QK-norm grads over TP, as megatron's ``finalize_model_grads`` does for a
    ``qk_layernorm`` config (each rank's q/k norm weights see only its own heads)."""
    if ps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            if ("q_layernorm" in name or "k_layernorm" in name) and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return grads(model)


def _logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0], -(lp.exp() * lp).sum(-1)


def tp_case(rank, world, tp, tie, kv, temperature, recompute="none"):
    """TP=tp, PP=1: logits (text, video, video + image), grads of a CE loss (video + image), RL log-probs (video)
    and their grads."""
    init_parallel(tp, 1)
    hf = tiny_qwen3_vl_model(0, tie_word_embeddings=tie, num_key_value_heads=kv)
    model = tiny_mcore_qwen3_vl(hf, recompute=recompute)
    out = {}
    for name, kwargs in (("text", dict(with_video=False)), ("video", dict(with_video=True)),
                         ("video+image", dict(with_video=True, with_image=True))):
        b = inputs(hf, **kwargs)
        with torch.no_grad():
            out[f"logits_diff_{name}"] = max_diff(mcore_logits(model, b), hf_logits(hf, b, b["position_ids"]), b)
    hf_ce = hf_grads(hf, lambda m: mean_ce(hf_logits(m, b, b["position_ids"]), b["labels"]))
    model.train().zero_grad()
    mean_ce(mcore_logits(model, b), b["labels"]).backward()
    out["ce_grads"] = {(rank, 0): tp_grads(model)}

    b = inputs(hf, with_video=True)
    valid = b["labels"] != -100
    ref_lp, ref_ent = _logprobs(hf_logits(hf, b, b["position_ids"]), b["labels"], temperature)
    model.zero_grad()
    lp, ent = model.forward_logprobs(b["input_ids"], b["position_ids"], b["labels"], temperature=temperature,
                                     return_entropy=True, attention_mask=b["attention_mask"], **visual(b))
    out["logprob_diff"] = (lp[valid] - ref_lp[valid].detach()).abs().max().item()
    out["entropy_diff"] = (ent[valid] - ref_ent[valid].detach()).abs().max().item()
    lp[valid].sum().backward()
    out["rl_grads"] = {(rank, 0): tp_grads(model)}
    if rank == 0:
        out["hf_ce_grads"] = hf_ce
        out["hf_rl_grads"] = hf_grads(hf, lambda m: _logprobs(hf_logits(m, b, b["position_ids"]), b["labels"],
                                                              temperature)[0][valid].sum())
    return out


def packed_case(rank, world):
    """forward_logprobs on the two rows packed into one (``cu_seqlens``, positions restarting per sequence) against
    the padded batch: max |log-prob diff|, |entropy diff| and max relative grad diff over all parameters."""
    init_parallel(1, 1)
    hf = tiny_qwen3_vl_model(0)
    model = tiny_mcore_qwen3_vl(hf).train()
    b = inputs(hf, with_video=True)
    keep = b["attention_mask"].bool()
    model.zero_grad()
    lp, ent = model.forward_logprobs(b["input_ids"], b["position_ids"], b["labels"], temperature=0.7,
                                     return_entropy=True, attention_mask=b["attention_mask"], **visual(b))
    lp[b["labels"] != -100].sum().backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters()}
    lengths = keep.sum(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).int()
    packed = dict(input_ids=b["input_ids"][keep][None], labels=b["labels"][keep][None],
                  position_ids=b["position_ids"][:, keep][:, None])
    model.zero_grad()
    plp, pent = model.forward_logprobs(packed["input_ids"], packed["position_ids"], packed["labels"], temperature=0.7,
                                       return_entropy=True, cu_seqlens=cu, **visual(b))
    valid = packed["labels"] != -100
    plp[valid].sum().backward()
    return {"logprob_diff": (plp[0] - lp[keep]).abs().max().item(), "entropy_diff": (pent[0] - ent[keep]).abs().max().item(),
            "grad_rel": max(((p.grad - padded[n]).abs().max() / padded[n].abs().max().clamp_min(1e-12)).item()
                            for n, p in model.named_parameters()),
            "tokens": int(valid.sum())}


def _microbatches(b: dict) -> list[dict]:
    """One micro-batch per row (row i holds video i)."""
    n = b["video_grid_thw"].prod(-1).tolist()
    starts = [0, n[0]]
    return [dict(input_ids=b["input_ids"][i:i + 1], attention_mask=b["attention_mask"][i:i + 1],
                 labels=b["labels"][i:i + 1], position_ids=b["position_ids"][:, i:i + 1],
                 video_grid_thw=b["video_grid_thw"][i:i + 1],
                 pixel_values_videos=b["pixel_values_videos"][starts[i]:starts[i] + n[i]]) for i in range(2)]


def pp_case(rank, world, tp, tie, recompute="none"):
    """TP=tp x PP=2 (DeepStack's LM layers 0, 1 on stage 0): logits via explicit stage-to-stage send; CE loss and
    grads via megatron's 1F1B (one micro-batch per row)."""
    init_parallel(tp, 2)
    hf = tiny_qwen3_vl_model(0, tie_word_embeddings=tie)
    model = tiny_mcore_qwen3_vl(hf, recompute=recompute)
    b = inputs(hf, with_video=True)
    out = stage_logits_diff(model, b, hf.config.text_config.hidden_size, mcore_logits,
                            lambda: hf_logits(hf, b, b["position_ids"]))
    model.train()
    micro = _microbatches(b)
    losses = run_1f1b(model, micro, b["input_ids"].shape[1], int((b["labels"] != -100).sum()))
    if ps.is_pipeline_last_stage():
        out["loss"] = sum(x["loss"] for x in losses).item() / len(micro)
        out["hf_loss"] = mean_ce(hf_logits(hf, b, b["position_ids"]), b["labels"]).item()
    out["grads"] = {(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()): tp_grads(model)}
    if rank == 0:
        out["hf_grads"] = hf_grads(hf, lambda m: mean_ce(hf_logits(m, b, b["position_ids"]), b["labels"]))
    return out


def freeze_case(rank, world):
    """Which parameters still require gradients after each freeze switch (parallel state initialised)."""
    hf = tiny_qwen3_vl_model(0)
    out = {}
    for switch in ("vision_tower", "merger", "language_model"):
        model = tiny_mcore_qwen3_vl(hf)
        model.freeze(**{switch: True})
        out[switch] = {n: p.requires_grad for n, p in model.named_parameters()}
    return out


def one_rank_suite(rank, world):
    """TP1 untied (2 query groups), TP1 tied (1 group) with full recompute, the packed path and the freeze switches,
    in one process."""
    return {"tp1": tp_case(rank, world, 1, False, 2, 0.7),
            "tp1_tied_recompute": tp_case(rank, world, 1, True, 1, 1.0, recompute="full"),
            "packed": packed_case(rank, world), "freeze": freeze_case(rank, world)}


def two_rank_suite(rank, world):
    """TP=2 tied and PP=2 tied with full recompute, on the same two ranks."""
    return {"tp2_tied": tp_case(rank, world, 2, True, 2, 0.7),
            "pp2_tied_recompute": pp_case(rank, world, 1, True, recompute="full")}


def two_rank_untied_suite(rank, world):
    """TP=2 and PP=2 untied (the slow half of the two-rank layouts)."""
    return {"tp2": tp_case(rank, world, 2, False, 2, 1.0), "pp2": pp_case(rank, world, 1, False)}
