"""Per-rank bodies of the packing tests: the same micro-batch packed into one row and padded to its longest sequence
through megatron-core's schedule, on the tiny model at TP x PP (fp32, CPU)."""
import torch

from tests.rl import _step_cases


def _prompts(config, tokenizer):
    """Two video prompts of different sizes and frame rates (so different lengths and M-RoPE positions)."""
    from megatron_tr1.data.prompt import build_prompt
    from megatron_tr1.data.video import VideoFrames

    out = []
    for seed, (t, h, w), fps in ((0, (4, 32, 48), 2.0), (1, (2, 16, 16), 0.5)):
        g = torch.Generator().manual_seed(seed)
        frames = torch.randint(0, 256, (t, 3, h, w), dtype=torch.uint8, generator=g)
        video = VideoFrames(frames=frames, timestamps=torch.arange(t, dtype=torch.float64) / fps,
                            indices=torch.arange(t), sample_fps=fps, duration=t / fps, total_frames=t, video_fps=fps)
        out.append(build_prompt(tokenizer, config, "a person opens the door" * (1 + seed), video))
    return out


def _losses(batch, output, cfg):
    """SFT's and GRPO's losses (kernels.grpo_loss, on-policy, with KL and entropy terms) of one micro-batch."""
    from megatron_tr1.rl.grpo import grpo_loss_fn
    from megatron_tr1.rl.sft import sft_loss_fn

    lp, ent = output
    sft, _ = sft_loss_fn(batch, lp)
    grpo, stats = grpo_loss_fn(batch, (lp, ent), cfg)
    return sft + grpo, {"lp": lp.detach(), "ent": ent.detach(), "sft": sft.detach(), "grpo": stats["loss"]}


def packed_vs_padded_case(rank, world, tp, pp):
    """Log-probs, entropies, both losses and every gradient of one micro-batch (sequences of 7 and 45 response
    tokens on two videos), packed and padded."""
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rl.batching import TokenSequence
    from megatron_tr1.rl.prompts import model_batch
    from megatron_tr1.rl.update import forward_backward
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    init_parallel(tp, pp)
    hf = tiny_hf_model(0)
    model = tiny_mcore_model(hf).train()
    cfg = _step_cases.step_config(kl_coef=0.1, entropy_coef=0.01)
    prompts = _prompts(hf.config, build_tiny_tokenizer())
    g = torch.Generator().manual_seed(5)
    seqs = [TokenSequence(p.input_ids, torch.randint(16, 500, (n,), generator=g).tolist())
            for p, n in zip(prompts, (7, 45))]
    out = {}
    for packed in (False, True):
        model.zero_grad()
        batch = model_batch(seqs, prompts, hf.config, packed=packed)
        batch |= {"weight": 1.0, "advantages": torch.tensor([0.7, -1.3]),
                  "ref": torch.zeros_like(batch["loss_mask"], dtype=torch.float32)}
        stats = forward_backward(model, [batch], lambda b, o: _losses(b, o, cfg), temperature=0.9, entropy=True)
        out[packed] = {"stats": stats, "slots": batch["input_ids"].numel(),
                       "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    mask = model_batch(seqs, prompts, hf.config)["loss_mask"]
    result = {"slots": (out[False]["slots"], out[True]["slots"])}
    if out[True]["stats"]:  # the last pipeline stage
        a, b = out[False]["stats"][0], out[True]["stats"][0]
        result.update(lp=(a["lp"][mask] - b["lp"][mask]).abs().max().item() / a["lp"][mask].abs().max().item(),
                      ent=(a["ent"][mask] - b["ent"][mask]).abs().max().item() / a["ent"][mask].abs().max().item(),
                      sft=abs(a["sft"] - b["sft"]).item() / abs(a["sft"]).item(),
                      grpo=abs(a["grpo"] - b["grpo"]).item() / abs(a["grpo"]).item())
    result["grad"] = max((out[False]["grads"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                         for n, g in out[True]["grads"].items())
    result["grads"] = len(out[True]["grads"])
    return result


def step_case(rank, world, packing: bool):
    """One GRPO step and one SFT step from the same start, with or without packing: the weights after each."""
    from megatron_tr1.distributed import wrap_ddp_and_optimizer
    from megatron_tr1.rl.grpo import grpo_step
    from megatron_tr1.rl.sft import sft_step
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights

    cfg = _step_cases.step_config(dynamic_sampling=False)
    cfg.optim.packing = packing
    cfg.optim.packing_min_saving = 0.0  # pack every micro-batch, however little padding it saves
    hf, model, tokenizer, items, ref = _step_cases.setup(cfg)
    engine = HFEngine(hf.config, tokenizer)
    sync_weights(model, hf.config, engine, dtype=torch.float32)
    # Adam's first step moves every weight by lr * g / (|g| + eps): with the default eps a gradient of ~0 (1e-9)
    # moves by up to lr whatever its digits, so both runs' steps are compared with an eps above such gradients
    (policy,), optimizer = wrap_ddp_and_optimizer([model], cfg.optim.lr, 0.0, cfg.optim.grad_clip, adam_eps=1e-3)
    metrics = grpo_step(policy, optimizer, engine, ref, items, cfg, tokenizer, hf.config, step=0,
                        reward_fn=_step_cases.length_reward)
    after_grpo = {k: v.detach().clone().numpy() for k, v in policy.named_parameters()}
    sft = sft_step(policy, optimizer, items, cfg, tokenizer, hf.config, think=True)
    after_sft = {k: v.detach().clone().numpy() for k, v in policy.named_parameters()}
    return {"grpo": after_grpo, "sft": after_sft, "metrics": metrics, "sft_metrics": sft}
