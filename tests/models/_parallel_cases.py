"""Per-rank bodies of the multi-rank model tests (importable by spawned ranks), and the grad comparison.

Each case builds a tiny HF model and the matching megatron model on every rank (weights through the
conversion mapping), runs text-only and text+video batches and returns what the parent asserts on:
max |logit diff| over real tokens, and the parameter gradients of a loss, mapped back to HF names.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tr1.testing.reference import mcore_to_hf_state
from megatron_tr1.distributed import init_parallel
from megatron_tr1.models.qwen2_5_vl import get_rope_index
from megatron_tr1.demo import tiny_hf_model
from megatron_tr1.testing.tiny_model import hf_logits, tiny_mcore_model, tiny_video_batch

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")


def inputs(config, with_video: bool) -> dict:
    """The tiny batch plus 3-D ``position_ids`` and next-token ``labels`` (-100 at padding and the end)."""
    b = tiny_video_batch(config, with_video=with_video)
    b["position_ids"] = get_rope_index(config, b["input_ids"], b["attention_mask"],
                                       video_grid_thw=b.get("video_grid_thw"),
                                       second_per_grid_ts=b.get("second_per_grid_ts"))
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, :-1] = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
    labels[b["attention_mask"] == 0] = -100
    b["labels"] = labels
    return b


def mcore_logits(model, b: dict) -> torch.Tensor:
    video = {k: b[k] for k in VIDEO_KEYS if k in b}
    return model(b["input_ids"], b["position_ids"], b["attention_mask"], **video)


def max_diff(ours: torch.Tensor, ref: torch.Tensor, b: dict) -> float:
    keep = b["attention_mask"].bool()
    return (ours[keep] - ref[keep]).abs().max().item()


def mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def grads(model) -> dict:
    """Parameter grads as numpy arrays (tensors cannot outlive a rank on the result queue)."""
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def hf_grads(hf, loss_fn) -> dict:
    """HF parameter grads of ``loss_fn(hf)`` keyed by on-disk HF names (as the mapping yields them)."""
    hf.zero_grad()
    loss_fn(hf).backward()
    disk = {"model.language_model.": "model.", "model.visual.": "visual."}
    out = {}
    for n, p in hf.named_parameters():
        for mem, dsk in disk.items():
            n = dsk + n[len(mem):] if n.startswith(mem) else n
        out[n] = p.grad.numpy().copy()
    return out


def compare_grads(rank_grads: dict, config, tp: int, pp: int, ref: dict) -> dict:
    """Max relative grad error per HF tensor (error / max |ref|) after merging the ranks' grads."""
    rank_grads = {k: {n: torch.from_numpy(g) for n, g in v.items()} for k, v in rank_grads.items()}
    ref = {n: torch.from_numpy(g) for n, g in ref.items()}
    ours = dict(mcore_to_hf_state(rank_grads, config, tp, pp))
    if config.tie_word_embeddings and pp > 1:  # megatron's last-stage copy: its grad adds to the embedding's
        copy = torch.cat([rank_grads[t, pp - 1]["language_model.output_layer.weight"] for t in range(tp)])
        ours["model.embed_tokens.weight"] = ours["model.embed_tokens.weight"] + copy
    assert ours.keys() == ref.keys() - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return {n: ((ours[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item() for n in ours}


def tp_case(rank, world, tp, tie, kv, temperature):
    """TP=tp, PP=1: logits (text, video), grads of a CE loss, RL log-probs and their grads."""
    init_parallel(tp, 1)
    hf = tiny_hf_model(0, tie_word_embeddings=tie, num_key_value_heads=kv)
    model = tiny_mcore_model(hf)
    out = {}
    for with_video in (False, True):
        b = inputs(hf.config, with_video)
        with torch.no_grad():
            out[f"logits_diff_video={with_video}"] = max_diff(mcore_logits(model, b), hf_logits(hf, b, b["position_ids"]), b)
    hf_ce = hf_grads(hf, lambda m: mean_ce(hf_logits(m, b, b["position_ids"]), b["labels"]))
    model.zero_grad()
    mean_ce(mcore_logits(model, b), b["labels"]).backward()
    out["ce_grads"] = {(rank, 0): grads(model)}

    video = {k: b[k] for k in VIDEO_KEYS}
    valid = b["labels"] != -100
    hf_lp = torch.log_softmax(hf_logits(hf, b, b["position_ids"]) / temperature, -1)
    ref_lp = hf_lp.gather(-1, b["labels"].clamp_min(0)[..., None])[..., 0]
    ref_ent = -(hf_lp.exp() * hf_lp).sum(-1)
    model.zero_grad()
    lp, ent = model.forward_logprobs(b["input_ids"], b["position_ids"], b["labels"], temperature=temperature,
                                     return_entropy=True, attention_mask=b["attention_mask"], **video)
    out["logprob_diff"] = (lp[valid] - ref_lp[valid].detach()).abs().max().item()
    out["entropy_diff"] = (ent[valid] - ref_ent[valid].detach()).abs().max().item()
    lp[valid].sum().backward()
    out["rl_grads"] = {(rank, 0): grads(model)}
    if rank == 0:
        out["hf_ce_grads"] = hf_ce
        out["hf_rl_grads"] = hf_grads(hf, lambda m: torch.log_softmax(hf_logits(m, b, b["position_ids"]) / temperature, -1)
                                      .gather(-1, b["labels"].clamp_min(0)[..., None])[..., 0][valid].sum())
    return out


def _microbatches(b: dict) -> list[dict]:
    """One micro-batch per row (each row holds one video)."""
    n = (b["video_grid_thw"].prod(-1)).tolist()
    starts = [0, n[0]]
    return [dict(input_ids=b["input_ids"][i:i + 1], attention_mask=b["attention_mask"][i:i + 1],
                 labels=b["labels"][i:i + 1], position_ids=b["position_ids"][:, i:i + 1],
                 video_grid_thw=b["video_grid_thw"][i:i + 1],
                 pixel_values_videos=b["pixel_values_videos"][starts[i]:starts[i] + n[i]]) for i in range(2)]


def stage_logits_diff(model, b: dict, hidden_size: int, ours, ref) -> dict:
    """PP=2 logits by an explicit stage-to-stage send: ``{"first": bool}`` and, on the last stage, ``logits_diff``
    between ``ours(model, b)`` and ``ref()``."""
    first = ps.is_pipeline_first_stage()
    peer = ps.get_pipeline_model_parallel_next_rank() if first else ps.get_pipeline_model_parallel_prev_rank()
    out = {"first": first}
    with torch.no_grad():
        if first:
            dist.send(ours(model, b).contiguous(), peer)
        else:
            hidden = torch.empty(b["input_ids"].shape[1], 2, hidden_size)
            dist.recv(hidden, peer)
            model.set_input_tensor(hidden)
            out["logits_diff"] = max_diff(ours(model, b), ref(), b)
    return out


def run_1f1b(model, micro: list[dict], seq_length: int, total: int) -> list:
    """Megatron's pipeline schedule over ``micro`` (one row each), the loss a token-mean CE over ``total`` tokens;
    gradients zeroed first. Returns the schedule's per-micro-batch losses (last stage)."""
    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"],
                       pixel_values_videos=mb["pixel_values_videos"], video_grid_thw=mb["video_grid_thw"])

        def loss_func(per_token):  # the schedule divides by the number of micro-batches
            loss = (per_token * (mb["labels"] != -100)).sum() * len(micro) / total
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place
        return output, loss_func

    model.zero_grad()
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model], num_microbatches=len(micro),
        seq_length=seq_length, micro_batch_size=1, forward_only=False)


def pp_case(rank, world, tp, tie):
    """TP=tp x PP=2: logits via explicit stage-to-stage send; CE loss and grads via megatron's 1F1B."""
    init_parallel(tp, 2)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    model = tiny_mcore_model(hf)
    b = inputs(hf.config, with_video=True)
    out = stage_logits_diff(model, b, hf.config.text_config.hidden_size, mcore_logits,
                            lambda: hf_logits(hf, b, b["position_ids"]))
    micro = _microbatches(b)
    losses = run_1f1b(model, micro, b["input_ids"].shape[1], int((b["labels"] != -100).sum()))
    if ps.is_pipeline_last_stage():
        out["loss"] = sum(x["loss"] for x in losses).item() / len(micro)
        out["hf_loss"] = mean_ce(hf_logits(hf, b, b["position_ids"]), b["labels"]).item()
    out["grads"] = {(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()): grads(model)}
    if rank == 0:
        out["hf_grads"] = hf_grads(hf, lambda m: mean_ce(hf_logits(m, b, b["position_ids"]), b["labels"]))
    return out


def freeze_case(rank, world):
    """Which parameters get gradients after each freeze switch."""
    init_parallel(1, 1)
    hf = tiny_hf_model(0)
    b = inputs(hf.config, with_video=True)
    out = {}
    for switch in ("vision_tower", "merger", "language_model"):
        model = tiny_mcore_model(hf).train()
        model.freeze(**{switch: True})
        mean_ce(mcore_logits(model, b), b["labels"]).backward()
        out[switch] = {n: (p.requires_grad, p.grad is not None) for n, p in model.named_parameters()}
    return out


def segments_case(rank, world):
    """A vision layer with segments as batch rows (``SegmentBatch``, unequal lengths: key-padding mask) against
    the same layer over the whole sequence with a block-diagonal mask: max |output diff| and |grad diff|."""
    from megatron_tr1.models.qwen2_5_vl.specs import SegmentBatch

    init_parallel(1, 1)
    model = tiny_mcore_model(tiny_hf_model(0))
    layer = model.vision.decoder.layers[0]
    cu = torch.tensor([0, 5, 8, 16, 29])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 1, model.vision.merger.ln_q.normalized_shape[0], generator=g, requires_grad=True)
    angles = torch.randn(29, 1, 1, model.vision.head_dim, generator=g)
    segment = torch.repeat_interleave(torch.arange(4), cu[1:] - cu[:-1])
    block = (segment[:, None] != segment[None, :]).view(1, 1, 29, 29)
    ref = layer(hidden_states=x, rotary_pos_emb=angles, attention_mask=block)[0]
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    ours = model.vision.specs.run_vision_layer(layer, x, angles, SegmentBatch.from_cu_seqlens(cu))
    (grad,) = torch.autograd.grad(ours.square().sum(), x)
    return {"out": (ours - ref).abs().max().item(), "grad": (grad - ref_grad).abs().max().item(),
            "equal_lengths_mask": SegmentBatch.from_cu_seqlens(torch.tensor([0, 4, 8])).mask}


def one_rank_suite(rank, world):
    """Everything that runs on one rank, in one process (process start-up dominates the test time)."""
    return {"tp1": tp_case(rank, world, 1, False, 2, 0.7), "tp1_gqa1_tied": tp_case(rank, world, 1, True, 1, 1.0),
            "freeze": freeze_case(rank, world), "segments": segments_case(rank, world)}


def two_rank_suite(rank, world):
    """TP=2 (tied) and PP=2 (untied, 1F1B) on the same two ranks."""
    return {"tp2": tp_case(rank, world, 2, True, 2, 0.7), "pp2": pp_case(rank, world, 1, False)}
