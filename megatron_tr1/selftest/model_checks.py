"""The megatron-core Qwen2.5-VL against HF transformers on the same weights (``tr1 verify``'s comparison, in
memory, on the tiny random model ``demo.tiny_hf_model``: biases and norms randomised, GQA, M-RoPE, window
attention, a patch merger).

The batch is ``convert.verify.synthetic_batch``: two rows of text around one random video each (0.5 and 4 fps,
so the temporal positions differ), at ``get_rope_index``'s M-RoPE positions for both models. Compared: the
logits (max |difference| over max |HF logit|), and the RL forward (``forward_logprobs``, through
``kernels.fused_linear_logprobs``) against HF's log-softmax of the next tokens.

- ``model_vs_hf`` fp32: tolerance 1e-5 relative (tests/models; measured <= 2e-6), log-probs 1e-5 absolute.
- ``model_vs_hf`` bf16 (GPU): the megatron model in bf16 vs HF in fp32, judged against HF in bf16 vs HF in fp32
  (``common.bf16_tolerance``), for logits and log-probs alike.
- ``te_vs_local_vs_hf`` (GPU + transformer-engine): the ``te`` layer spec in bf16 against the same rule, and
  its distance from the ``local`` spec reported.
"""
from __future__ import annotations

import torch

from megatron_tr1.selftest import common
from megatron_tr1.selftest.registry import Measured


def _batch(config, seed: int = 0) -> dict:
    from megatron_tr1.convert.verify import synthetic_batch

    batch = synthetic_batch(config, seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, :-1] = batch["input_ids"][:, 1:]
    batch["labels"] = labels
    return batch


def _mcore_outputs(model, batch: dict, positions: torch.Tensor, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 [b, s, v], log-probs float32 [b, s]) of the megatron model, on the CPU."""
    dev = backend.device
    video = dict(pixel_values_videos=batch["pixel_values_videos"].to(dev, backend.dtype),
                 video_grid_thw=batch["video_grid_thw"].to(dev))
    ids, pos, labels = batch["input_ids"].to(dev), positions.to(dev), batch["labels"].to(dev)
    with torch.no_grad():
        logits = model(ids, pos, **video).float().cpu()
        logprobs = model.forward_logprobs(ids, pos, labels, **video).float().cpu()
    return logits, logprobs


def _hf_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return lp.masked_fill(labels == -100, 0.0)


def _errors(logits, logprobs, ref_logits, ref_logprobs, labels) -> tuple[float, float]:
    """(max |logit diff| / max |ref logit|, max |log-prob diff| over labelled tokens)."""
    keep = labels != -100
    scale = ref_logits.abs().max().item()
    return common.max_abs(logits, ref_logits) / scale, common.max_abs(logprobs[keep], ref_logprobs[keep])


def _hf_references(hf, batch, positions, device) -> dict:
    """HF fp32 logits / log-probs, and (bf16 backends) HF bf16's own errors against them."""
    hf = hf.to(device)
    ref = {"logits": common.hf_logits(hf, batch, positions, device, torch.float32)}
    ref["logprobs"] = _hf_logprobs(ref["logits"], batch["labels"])
    return ref


def model_vs_hf(dtype: str = "fp32") -> Measured:
    from megatron_tr1.demo import tiny_hf_model

    backend = common.check_backend(dtype)
    common.init_one_rank(backend)
    hf = tiny_hf_model(0)
    batch = _batch(hf.config)
    positions = common.rope_positions(hf.config, batch)
    model = common.mcore_model(hf, backend)
    logits, logprobs = _mcore_outputs(model, batch, positions, backend)
    ref = _hf_references(hf, batch, positions, backend.device)
    logit_err, lp_err = _errors(logits, logprobs, ref["logits"], ref["logprobs"], batch["labels"])
    numbers = {"logits_rel_err": logit_err, "logprobs_abs_err": lp_err, "tokens": int(batch["input_ids"].numel()),
               "max_abs_logit": ref["logits"].abs().max().item(), "device": str(backend.device)}
    if dtype == "fp32":
        ok = logit_err <= common.FP32_RTOL and lp_err <= common.FP32_RTOL
        return Measured(f"logits {logit_err:.1e}, logp {lp_err:.1e}",
                        f"logits <= {common.FP32_RTOL:g} max|logit|, logp <= {common.FP32_RTOL:g}", ok,
                        numbers)
    twin = common.bf16_twin(hf, backend.device)
    twin_logits = common.hf_logits(twin, batch, positions, backend.device, torch.bfloat16)
    hf_logit_err, hf_lp_err = _errors(twin_logits, _hf_logprobs(twin_logits, batch["labels"]), ref["logits"],
                                      ref["logprobs"], batch["labels"])
    tol_logits, tol_lp = common.bf16_tolerance(hf_logit_err, 1e-3), common.bf16_tolerance(hf_lp_err, 1e-3)
    numbers.update(hf_bf16_logits_rel_err=hf_logit_err, hf_bf16_logprobs_abs_err=hf_lp_err, tol_logits=tol_logits,
                   tol_logprobs=tol_lp)
    return Measured(f"logits {logit_err:.1e}, logp {lp_err:.1e} (vs HF fp32)",
                    f"{common.BF16_FACTOR:g} x HF bf16 error + 1e-3: {tol_logits:.1e}, {tol_lp:.1e}",
                    logit_err <= tol_logits and lp_err <= tol_lp, numbers)


def te_vs_local_vs_hf() -> Measured:
    """The ``te`` spec (bf16) vs HF fp32 under the bf16 rule; its distance from the ``local`` spec reported."""
    from megatron_tr1.demo import tiny_hf_model

    te_backend = common.check_backend("bf16", "te")
    local_backend = common.check_backend("bf16", "local")
    common.init_one_rank(te_backend)
    hf = tiny_hf_model(0)
    batch = _batch(hf.config)
    positions = common.rope_positions(hf.config, batch)
    te_logits, te_lp = _mcore_outputs(common.mcore_model(hf, te_backend), batch, positions, te_backend)
    local_logits, _ = _mcore_outputs(common.mcore_model(hf, local_backend), batch, positions, local_backend)
    ref = _hf_references(hf, batch, positions, te_backend.device)
    twin_logits = common.hf_logits(common.bf16_twin(hf, te_backend.device), batch, positions, te_backend.device,
                                   torch.bfloat16)
    hf_logit_err, _ = _errors(twin_logits, _hf_logprobs(twin_logits, batch["labels"]), ref["logits"],
                              ref["logprobs"], batch["labels"])
    te_err, te_lp_err = _errors(te_logits, te_lp, ref["logits"], ref["logprobs"], batch["labels"])
    te_vs_local = common.max_abs(te_logits, local_logits) / ref["logits"].abs().max().item()
    tol = common.bf16_tolerance(hf_logit_err, 1e-3)
    numbers = {"te_logits_rel_err": te_err, "te_logprobs_abs_err": te_lp_err, "te_vs_local_rel": te_vs_local,
               "hf_bf16_logits_rel_err": hf_logit_err, "tol": tol}
    return Measured(f"te-HF {te_err:.1e}, te-local {te_vs_local:.1e}",
                    f"each <= {common.BF16_FACTOR:g} x HF bf16 error + 1e-3 = {tol:.1e}",
                    te_err <= tol and te_vs_local <= tol, numbers)


def packed_vs_padded(dtype: str = "fp32") -> Measured:
    """One micro-batch of two video prompts with responses of 5 and 40 tokens, packed into one row
    (``optim.packing``: megatron's ``thd`` on this backend's layer spec) and padded: the RL forward's log-probs and
    entropies must agree (fp32: 1e-5 relative, as tests/rl/test_packing.py; bf16: 5e-2 absolute on log-probs, not yet
    measured on a GPU)."""
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model
    from megatron_tr1.rl.batching import TokenSequence
    from megatron_tr1.rl.prompts import model_batch, policy_logprobs

    backend = common.check_backend(dtype)
    common.init_one_rank(backend)
    hf = tiny_hf_model(0)
    model = common.mcore_model(hf, backend)
    tokenizer = build_tiny_tokenizer()
    prompts = [common.video_prompt(hf.config, tokenizer, seed, fps) for seed, fps in ((0, 2.0), (1, 0.5))]
    g = torch.Generator().manual_seed(0)
    seqs = [TokenSequence(p.input_ids, torch.randint(16, 500, (n,), generator=g).tolist())
            for p, n in zip(prompts, (5, 40))]
    out = {}
    for packed in (False, True):
        batch = model_batch(seqs, prompts, hf.config, packed=packed)
        batch = {k: (v.to(backend.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch["pixel_values_videos"] = batch["pixel_values_videos"].to(backend.dtype)
        with torch.no_grad():
            lp, ent = policy_logprobs(model, batch, return_entropy=True)
        out[packed] = (lp.float().cpu(), ent.float().cpu(), batch["input_ids"].numel())
    mask = model_batch(seqs, prompts, hf.config)["loss_mask"]
    lp_err = common.max_abs(out[True][0][mask], out[False][0][mask])
    ent_err = common.max_abs(out[True][1][mask], out[False][1][mask])
    numbers = {"logprobs_abs_err": lp_err, "entropy_abs_err": ent_err, "slots_padded": out[False][2],
               "slots_packed": out[True][2], "layer_spec": backend.layer_spec}
    if dtype == "fp32":
        scale = out[False][0][mask].abs().max().item()
        return Measured(f"logp {lp_err / scale:.1e}, entropy {ent_err:.1e}; slots {out[True][2]} vs {out[False][2]}",
                        "<= 1e-05 relative", lp_err <= 1e-5 * scale and ent_err <= 1e-5 * max(scale, 1.0), numbers)
    return Measured(f"logp {lp_err:.1e}, entropy {ent_err:.1e} ({backend.layer_spec})", "<= 5e-2 absolute",
                    lp_err <= 5e-2 and ent_err <= 5e-2, numbers)
