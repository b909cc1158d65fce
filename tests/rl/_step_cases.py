"""Per-rank bodies of the GRPO and SFT step tests (one gloo rank, tiny model, fp32 on CPU).

Both build two synthetic videos (``data.synthetic.generate``, 56x56, 4 frames sampled) and their prompts
through ``rl.prompts.grounding_prompt``. Ranks return Python / numpy values only.
"""
import tempfile

import torch

from megatron_tr1.data import synthetic
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.rl.config import DataSection, OptimConfig, RolloutConfig, TrainConfig, VideoBudget
from megatron_tr1.rl.prompts import grounding_prompt


def step_config(**algorithm) -> TrainConfig:
    """2 prompts x n=4, 16 new tokens, micro-batches of 4 and one update of 8 sequences per step."""
    cfg = TrainConfig(rollout=RolloutConfig(n=4, prompts_per_step=2, max_tokens=16, temperature=1.0),
                      optim=OptimConfig(lr=1e-3, weight_decay=0.0, micro_batch_size=4, global_batch_size=8),
                      data=DataSection(video=VideoBudget(max_frames=4)))
    for key, value in algorithm.items():
        setattr(cfg.algorithm, key, value)
    return cfg


def setup(cfg: TrainConfig):
    """Parallel state, the tiny HF model, its megatron twin (the policy), the tokenizer, two synthetic prompts and
    a second twin (the frozen reference)."""
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.testing.tiny_model import tiny_mcore_model
    from megatron_tr1.demo import build_tiny_tokenizer

    init_parallel(1, 1)
    hf = tiny_hf_model(0)
    tokenizer = build_tiny_tokenizer()
    folder = tempfile.mkdtemp()
    synthetic.generate(folder, 2, num_test=0, num_ood=0, size=56, progress=False)
    samples = load_samples(load_data_config(f"{folder}/train.yaml")).samples
    items = [grounding_prompt(s, cfg, tokenizer, hf.config) for s in samples]
    return hf, tiny_mcore_model(hf).train(), tokenizer, items, tiny_mcore_model(hf)


def length_reward(response, gt, duration, format_weight=0.5):
    """A reward with spread for a random model (the real one is 0 for every random response)."""
    score = len(response) / 100.0
    return {"overall": score, "format": 0.0, "accuracy": score}


def constant_reward(response, gt, duration, format_weight=0.5):
    return {"overall": 1.0, "format": 1.0, "accuracy": 1.0}


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def grpo_case(rank, world):
    """Three steps with megatron DDP + DistributedOptimizer and a spread reward (the third with the KL in the
    reward), then one all-equal-reward step."""
    from megatron_tr1.distributed import wrap_ddp_and_optimizer
    from megatron_tr1.rl.grpo import grpo_step
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights

    cfg = step_config(dynamic_sampling=False)
    hf, model, tokenizer, items, ref = setup(cfg)
    engine = HFEngine(hf.config, tokenizer)
    sync_weights(model, hf.config, engine, dtype=torch.float32)
    (policy,), optimizer = wrap_ddp_and_optimizer([model], cfg.optim.lr, 0.0, cfg.optim.grad_clip)
    args = (engine, ref, items, cfg, tokenizer, hf.config)

    before = _params(policy)
    first = grpo_step(policy, optimizer, *args, step=0, reward_fn=length_reward)
    change = max((p - before[k]).abs().max().item() for k, p in policy.named_parameters())
    second = grpo_step(policy, optimizer, *args, step=1, reward_fn=length_reward)  # its mismatch: after the sync
    in_reward = step_config(dynamic_sampling=False, kl_in_reward=True)
    kl_reward = grpo_step(policy, optimizer, engine, ref, items, in_reward, tokenizer, hf.config, step=2,
                          reward_fn=length_reward)

    # all-equal rewards: zero advantages; without KL / entropy terms the whole gradient is the PG part.
    # The policy is now the unwrapped twin with a torch optimizer (the other optimizer path, no momentum yet).
    flat = step_config(dynamic_sampling=True, max_sampling_tries=2, kl_coef=0.0, entropy_coef=0.0)
    policy = ref.train()
    before = _params(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, weight_decay=0.0)
    third = grpo_step(policy, optimizer, engine, None, items, flat, tokenizer, hf.config, step=3,
                      reward_fn=constant_reward, refill=lambda k: items[:k])
    grads = max(p.grad.abs().max().item() for p in policy.parameters() if p.grad is not None)
    unchanged = max((p - before[k]).abs().max().item() for k, p in policy.named_parameters())
    return {"first": first, "second": second, "kl_reward": kl_reward, "third": third, "change": change,
            "flat_grad": grads, "flat_change": unchanged}


def old_from_update_case(rank, world):
    """One GRPO step taking the old log-probs from the update's forward, and the same step with a separate
    old-policy pass (twin policies, engines and optimizers): metrics and updated weights."""
    from unittest import mock

    from megatron_tr1.rl import grpo
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    cfg = step_config(dynamic_sampling=False)
    hf, policy, tokenizer, items, ref = setup(cfg)
    out = {}
    for name, shortcut in (("shortcut", True), ("separate", False)):
        model = tiny_mcore_model(hf).train()
        engine = HFEngine(hf.config, tokenizer)
        sync_weights(model, hf.config, engine, dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.0)
        with mock.patch.object(grpo, "old_from_update", lambda n, c: shortcut), \
                mock.patch.object(grpo, "response_logprobs", wraps=grpo.response_logprobs) as passes:
            metrics = grpo.grpo_step(model, optimizer, engine, ref, items, cfg, tokenizer, hf.config, step=0,
                                     reward_fn=length_reward)
        out[name] = {"metrics": metrics, "params": _params(model), "passes": passes.call_count}
    a, b = out["shortcut"], out["separate"]
    return {"passes": (a["passes"], b["passes"]), "metrics": (a["metrics"], b["metrics"]),
            "param_diff": max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"]),
            "moved": max((a["params"][k] - v).abs().max().item() for k, v in _params(ref).items())}


def stale_engine_case(rank, world):
    """The engine holds stale weights (the policy's, perturbed: sampled-token log-probs ~1.5 nat off the trainer's):
    one GRPO step from the same policy and rollouts without and with TIS (policy-gradient term only, plain SGD, no
    clipping: the parameter change is the gradient). Returns each step's metrics and parameter change (L2)."""
    from megatron_tr1.rl.grpo import grpo_step
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    cfg = step_config(dynamic_sampling=False, kl_coef=0.0, entropy_coef=0.0)
    cfg.optim.grad_clip = 0.0
    hf, _, tokenizer, items, _ = setup(cfg)
    stale = tiny_mcore_model(hf)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(2.75 * p.abs().mean().clamp(min=1e-3) * torch.randn(p.shape, generator=g))
    out = {}
    for correction in ("none", "tis"):
        cfg.algorithm.rollout_correction = correction
        model = tiny_mcore_model(hf).train()
        engine = HFEngine(hf.config, tokenizer)
        sync_weights(stale, hf.config, engine, dtype=torch.float32)
        before = _params(model)
        metrics = grpo_step(model, torch.optim.SGD(model.parameters(), lr=1.0), engine, None, items, cfg, tokenizer,
                            hf.config, step=0, reward_fn=length_reward)
        change = sum(((p - before[k]) ** 2).sum().item() for k, p in model.named_parameters()) ** 0.5
        out[correction] = {"metrics": metrics, "change": change}
    return out


def sft_case(rank, world):
    from megatron_tr1.rl.batching import sft_target
    from megatron_tr1.rl.prompts import model_batch
    from megatron_tr1.rl.sft import sft_sequences, sft_step
    from megatron_tr1.rollout.engine import stop_token_id

    cfg = step_config()
    hf, policy, tokenizer, items, _ = setup(cfg)
    seqs = sft_sequences(items, tokenizer)
    batch = model_batch(seqs, [i.prompt for i in items], hf.config)
    masked = [batch["labels"][row][batch["loss_mask"][row]].tolist() for row in range(len(seqs))]
    expected = [tokenizer(sft_target(*i.gt), add_special_tokens=False)["input_ids"]
                + [stop_token_id(tokenizer)] for i in items]
    first_masked = [int(batch["loss_mask"][row].nonzero()[0]) for row in range(len(seqs))]
    prompt_lengths = [len(s.prompt_ids) for s in seqs]

    # the token-mean over both samples does not depend on the micro-batch split (lr 0: nothing moves)
    frozen = torch.optim.SGD(policy.parameters(), lr=0.0)
    split = []
    for micro_batch_size in (1, 2):
        cfg.optim.micro_batch_size = micro_batch_size
        split.append(sft_step(policy, frozen, items, cfg, tokenizer, hf.config))

    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)
    losses = [sft_step(policy, optimizer, items[:1], cfg, tokenizer, hf.config) for _ in range(6)]
    return {"masked": masked, "texts": [tokenizer.decode(m) for m in masked], "gts": [i.gt for i in items],
            "expected": expected, "first_masked": first_masked, "prompt_lengths": prompt_lengths, "split": split,
            "metrics": losses}
