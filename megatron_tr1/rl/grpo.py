"""One GRPO step, top to bottom (the data flow of /work/shared/design.md):

1. rollouts: the engine samples ``rollout.n`` responses per prompt; each is scored with ``safe_reward``;
   with ``algorithm.dynamic_sampling`` zero-spread groups are dropped and refilled from ``refill``;
2. sequences (group-major) are cut into padded micro-batches (``rl.prompts.model_batch``);
3. old-policy and reference log-probs (no grad) with ``forward_logprobs``; the engine's sampled-token
   log-probs are compared with the old-policy ones (``logprob_mismatch``: a sync or kernel bug shows here).
   When the step makes one update (all sequences in one ``global_batch_size`` slice) and the KL is not in the
   reward, the old policy *is* the policy being updated: its log-probs are taken, detached, from the update's
   own forward instead of a separate pass (as verl does; the ratio is then exactly 1, its gradient unchanged);
4. advantages: optional KL-in-reward, ``group_advantages``, overlong filtering of the loss mask;
5. update: for each ``global_batch_size`` slice, ``kernels.grpo_loss`` per micro-batch (``algorithm.loss_type``,
   ``rollout_correction`` against the engine's sampled-token log-probs) through megatron-core's forward-backward
   schedule (``micro_batch_weights``: each micro-batch's loss weighted by its share of the slice's tokens or
   sequences, so the slice's ``agg`` is exact; or, ``agg_scope=micro-batch``, EasyR1's mean of micro-batch
   losses), then clipping and the optimizer step;
6. ``sync_weights`` pushes the new policy into the engine.

Model-parallel notes: micro-batches run through ``get_forward_backward_func`` (at PP=1
``forward_backward_no_pipelining``, at PP>1 1F1B with ``variable_seq_lengths``). The log-probs of step 3, the loss
and its statistics exist on the last pipeline stage only (the others hold zeros: the trainer takes the step's
metrics from the last stage). Every rank of a model-parallel group trains on the same rollouts
(``rollout.placement``: every rank generates a slice of the step's prompts and gets back its own replica's); at
DP>1 each replica trains on its own prompts, and the token count that weights the loss is summed over DP
(``loss_weights``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

import kernels
from kernels.reference import kl_penalty, rollout_keep
from megatron_tr1.rewards import REWARDS
from megatron_tr1.rl.advantages import DynamicSampler, group_advantages, kl_penalized_rewards, overlong_keep
from megatron_tr1.rl.balance import balance_groups
from megatron_tr1.rl.batching import TokenSequence, place_response
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.guards import safe_reward
from megatron_tr1.rl.prompts import GroundingPrompt
from megatron_tr1.rl.update import (batch_stats, forward_backward, loss_weights, micro_batches, optimizer_step,
                                    unwrap, zero_grad)
from megatron_tr1.rl.stats import StepTimer, length_stats, logprob_mismatch, reward_stats, task_reward_stats
from megatron_tr1.rollout.engine import Response, Sampling, stop_token_id
from megatron_tr1.rollout.weight_sync import sync_weights


@dataclasses.dataclass
class Group:
    """One prompt's ``n`` responses and their reward dicts (``failed``: the reward function raised)."""

    item: GroundingPrompt
    responses: list[Response]
    rewards: list[dict[str, float]]
    failed: list[bool]


def score(item: GroundingPrompt, responses: list[Response], reward_fn: Callable, cfg: TrainConfig) -> Group:
    """Score each response with ``safe_reward(reward_fn, ...)`` (a raising reward scores 0 and is counted); a
    prompt of another task than grounding with its own reward (``item.reward``, ``megatron_tr1.tasks``)."""
    reward_fn = REWARDS[item.reward] if getattr(item, "reward", None) else reward_fn
    scored = [safe_reward(reward_fn, x.text, item.gt, item.duration, format_weight=cfg.algorithm.format_weight)
              for x in responses]
    return Group(item, responses, [s for s, _ in scored], [f for _, f in scored])


def collect_groups(engine, items, cfg: TrainConfig, reward_fn, step: int, refill, timer) -> tuple[list[Group], dict]:
    """``rollout.n`` scored responses per prompt of ``items``; with dynamic sampling, more batches from
    ``refill(k)`` (k prompts) until ``len(items)`` groups with a reward spread are found or
    ``max_sampling_tries`` batches were drawn. Returns the groups and the dynamic-sampling stats.

    Generation is collective when every rank is a rollout worker (``rollout.placement``): all ranks go round the
    loop together, as long as any rank still lacks groups (one all-reduce per round); a rank that has enough draws
    its refill too (``refill`` is collective: sampler positions stay equal) but generates nothing more."""
    a, r = cfg.algorithm, cfg.rollout
    tries = a.max_sampling_tries if a.dynamic_sampling and refill is not None else 1
    sampler = DynamicSampler(target=len(items), max_tries=tries)
    spacing = len(items) * getattr(engine, "dp_size", 1)  # prompts in a round over all data-parallel replicas
    batch, attempt = list(items), 0
    while True:
        seed = r.seed + (step * tries + attempt) * spacing  # the step's prompt g samples with seed + g
        sampling = Sampling(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed)
        with timer("rollout"):
            responses = engine.generate([i.prompt for i in batch], r.n, sampling)
        with timer("reward"):
            groups = [score(item, rs, reward_fn, cfg) for item, rs in zip(batch, responses)]
        if groups:
            sampler.add(groups, torch.tensor([x["overall"] for g in groups for x in g.rewards]))
        attempt += 1
        if _everywhere(sampler.done):
            break
        more = refill(len(items))
        batch = [] if sampler.done else more
    if not a.dynamic_sampling:
        return groups, {}
    return sampler.take(), sampler.stats()


def _everywhere(done: bool) -> bool:
    """Whether ``done`` holds on every rank (one all-reduce; ``done`` itself without a process group)."""
    flag = torch.tensor([1.0 if done else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def training_sequence(prompt_ids: list[int], response_ids: list[int], hf_config, pad_id: int
                      ) -> tuple[TokenSequence, bool]:
    """The sequence the trainer sees, and whether it can be trained on. A response that sampled an image or
    video placeholder token cannot be fed back (the model would take it for a visual position): its response
    becomes ``pad_id`` tokens and it is left out of the loss and the mismatch (``False``)."""
    placeholders = {hf_config.image_token_id, hf_config.video_token_id}
    if placeholders.isdisjoint(response_ids):
        return TokenSequence(list(prompt_ids), list(response_ids)), True
    return TokenSequence(list(prompt_ids), [pad_id] * len(response_ids)), False


def _per_token(values: list[torch.Tensor], rows: list[int], batch: dict) -> torch.Tensor:
    """Per-response-token ``values[row]`` placed at the positions that predict them, ``[B, L]``."""
    width = batch["width"]
    return torch.stack([place_response(values[r], int(p), width) for r, p in zip(rows, batch["prompt_lengths"])])


def response_logprobs(model, mbs: list[tuple[list[int], dict]], seqs: list[TokenSequence], temperature: float
                      ) -> list[torch.Tensor]:
    """Each sequence's response-token log-probs ``[R]`` under ``model`` (no grad), over the micro-batches. Only
    the last pipeline stage computes them; the others get zeros (they only feed the loss, computed there)."""
    results = forward_backward(model, [b for _, b in mbs], lambda b, lp: (torch.zeros(()), {"lp": lp.detach()}),
                               temperature, forward_only=True)
    return _responses(mbs, results, seqs)


def old_from_update(num_sequences: int, cfg: TrainConfig) -> bool:
    """Whether the old-policy log-probs come from the update's own forward: one update per step (every
    sequence in one ``global_batch_size`` slice), no KL in the reward (which needs them before the update) and no
    masked importance sampling weighing the update's micro-batches (their kept tokens depend on them)."""
    a = cfg.algorithm
    masking = a.rollout_correction in ("mis", "seq-mis") and a.agg_scope == "update"
    return num_sequences <= cfg.stage_batch("grpo") and not a.kl_in_reward and not masking


def grpo_loss_fn(batch: dict, output, cfg: TrainConfig):
    """``kernels.grpo_loss`` of one micro-batch times its ``weight`` (its share of the update's tokens or rows)."""
    a = cfg.algorithm
    logprobs, entropy = output
    on_policy = "old_logprobs" not in batch  # one update per step: the old policy is this forward's
    old = logprobs.detach() if on_policy else batch["old_logprobs"]
    loss, stats = kernels.grpo_loss(
        logprobs, old, batch["advantages"], batch["loss_mask"], ref_logprobs=batch.get("ref"),
        clip_low=a.clip_low, clip_high=a.clip_high, clip_dual=a.clip_dual,
        kl_coef=0.0 if a.kl_in_reward else a.kl_coef, kl_type=a.kl_type, entropy=entropy,
        entropy_coef=a.entropy_coef, agg=a.agg, loss_type=a.loss_type,
        rollout_logprobs=batch.get("rollout_logprobs"), rollout_correction=a.rollout_correction,
        rollout_cap=a.rollout_cap, agg_norm_len=cfg.rollout.max_tokens)
    tokens = batch["loss_mask"].sum()
    ent = (entropy.detach() * batch["loss_mask"]).sum() / tokens.clamp(min=1)
    return loss * batch["weight"], {"loss": loss.detach(), "tokens": tokens, "entropy": ent, **stats} | \
        ({"lp": old} if on_policy else {})


def micro_batch_weights(batches: list[dict], cfg: TrainConfig) -> list[float]:
    """Each micro-batch's loss weight in one update. ``algorithm.agg_scope=update``: its share (over data
    parallel, ``loss_weights``) of the update's loss tokens for ``token-mean``, of its sequences with loss tokens
    for ``seq-mean-token-mean`` (and GSPO's policy term), of its sequences otherwise; tokens that masked importance
    sampling drops do not count. The update's loss is then ``agg`` over the whole update, however it is cut.
    ``micro-batch``: 1 / the number of micro-batches (EasyR1's: ``agg`` within each micro-batch, divided by the
    accumulation steps; the replicas' gradients are averaged over data parallel either way)."""
    a = cfg.algorithm
    if a.agg_scope == "micro-batch":
        return [1.0 / len(batches)] * len(batches)
    agg, units = "seq-mean-token-mean" if a.loss_type == "gspo" else a.agg, []
    for batch in batches:
        mask = batch["loss_mask"].float()
        if a.rollout_correction in ("mis", "seq-mis"):
            mask = rollout_keep(batch["old_logprobs"], batch["rollout_logprobs"], mask, a.rollout_correction,
                                a.rollout_cap)
        units.append(float(mask.sum()) if agg == "token-mean" else float((mask.sum(-1) > 0).sum())
                     if agg == "seq-mean-token-mean" else float(mask.shape[0]))
    return loss_weights(units)


def update(policy, optimizer, seqs, prompts, old, ref, advantages, keep, cfg: TrainConfig, hf_config, pad_id,
           all_mbs: list[tuple[list[int], dict]] | None = None, rollout: list[torch.Tensor] | None = None
           ) -> tuple[dict[str, float], list[torch.Tensor] | None]:
    """One optimizer step per ``global_batch_size`` slice of the sequences; token-means of the loss statistics,
    the largest gradient norm and the number of updates. ``old`` None (one slice only): the old-policy
    log-probs come from the update's forward and are returned per sequence (else None is returned).
    ``all_mbs``: micro-batches already built over every sequence, reused when the sequences make one slice.
    ``rollout``: the engine's sampled-token log-probs per sequence (``algorithm.rollout_correction``)."""
    a, size = cfg.algorithm, cfg.stage_batch("grpo")
    if old is None and len(seqs) > size:
        raise ValueError(f"{len(seqs)} sequences make more than one update of {size}: old log-probs are needed")
    stats, grad_norms, slices = [], [], []
    for start in range(0, len(seqs), size):
        update_rows = list(range(start, min(start + size, len(seqs))))
        mbs = all_mbs if all_mbs is not None and len(update_rows) == len(seqs) else \
            micro_batches(seqs, prompts, update_rows, cfg, hf_config, pad_id)
        slices += mbs
        for rows, batch in mbs:
            batch["loss_mask"] &= keep[rows][:, None]
            if old is not None:
                batch["old_logprobs"] = _per_token(old, rows, batch)
            if ref is not None and not a.kl_in_reward:
                batch["ref"] = _per_token(ref, rows, batch)
            if a.rollout_correction != "none":
                batch["rollout_logprobs"] = _per_token(rollout, rows, batch)
            batch["advantages"] = advantages[rows]
        for (_, batch), weight in zip(mbs, micro_batch_weights([b for _, b in mbs], cfg)):
            batch["weight"] = weight
        zero_grad(policy, optimizer)
        stats += forward_backward(policy, [b for _, b in mbs], lambda b, out: grpo_loss_fn(b, out, cfg),
                                  cfg.rollout.temperature, entropy=True)
        grad_norms.append(optimizer_step(policy, optimizer, cfg.optim.grad_clip))
    tokens = max(float(sum(s["tokens"] for s in stats)), 1.0)
    keys = ("loss", "kl", "clip_frac", "ppo_kl", "entropy") + \
        (("rc_weight_mean", "rc_masked_frac") if a.rollout_correction != "none" else ())
    out = {k: float(sum(s[k] * s["tokens"] for s in stats)) / tokens for k in keys}
    return out | {"grad_norm": max(grad_norms), "updates": len(grad_norms)}, \
        None if old is not None else _responses(slices, stats, seqs)


def _responses(mbs: list[tuple[list[int], dict]], results: list[dict], seqs: list[TokenSequence]
               ) -> list[torch.Tensor]:
    """Each sequence's response-token log-probs ``[R]`` from per-micro-batch ``results[i]["lp"]`` ``[B, L]``
    (zeros where there are no results: pipeline stages before the last)."""
    out: list[torch.Tensor] = [torch.zeros(len(s.response_ids)) for s in seqs]
    for (rows, _), result in zip(mbs, results):
        for i, r in enumerate(rows):
            p = len(seqs[r].prompt_ids)
            out[r] = result["lp"][i, p - 1: p - 1 + len(seqs[r].response_ids)]
    return out


def grpo_step(policy, optimizer, engine, ref_model, prompts_with_gt: Sequence[GroundingPrompt], cfg: TrainConfig,
              tokenizer, hf_config, *, step: int = 0, think: bool | None = None,
              refill: Callable[[int], list[GroundingPrompt]] | None = None,
              reward_fn: Callable | None = None, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """One GRPO step on ``prompts_with_gt`` (this rank's prompts); returns the step's metrics.

    ``policy``: the model ``optimizer`` steps (megatron DDP-wrapped with a megatron optimizer, or plain with a
    torch one); ``ref_model``: the frozen reference (unused when ``algorithm.kl_coef`` is 0; may then be None);
    ``engine``: the rollout engine, holding the policy's weights and left holding the updated ones.
    ``step`` seeds sampling; ``think`` picks the reward (``algorithm.reward_name``); ``refill(k)`` gives k more
    prompts for dynamic sampling; ``reward_fn`` overrides the configured reward; ``sync`` (the backend's) makes
    the step's timers wait for the device. The engine sleeps during the update and is left awake after the sync.
    """
    a, timer = cfg.algorithm, StepTimer(sync)
    reward_fn = reward_fn or REWARDS[a.reward_name(think)]
    stop_id, pad_id = stop_token_id(tokenizer), tokenizer.pad_token_id or 0

    # 1. rollouts and rewards
    engine.wake_up()
    groups, metrics = collect_groups(engine, prompts_with_gt, cfg, reward_fn, step, refill, timer)
    engine.sleep()
    responses = [x for g in groups for x in g.responses]
    rewards = [x for g in groups for x in g.rewards]
    metrics |= reward_stats(rewards, [f for g in groups for f in g.failed], cfg.rollout.n)
    metrics |= task_reward_stats([(getattr(g.item, "task", "temporal_grounding"), g.rewards) for g in groups])
    metrics |= length_stats([len(x.token_ids) for x in responses], [x.finish_reason == "length" for x in responses])
    if cfg.optim.balance_tokens and ps.model_parallel_is_initialized():  # whole groups change DP ranks (rl.balance)
        groups, balanced = balance_groups(groups, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                                          ps.get_data_parallel_group())
        metrics |= balanced
        rewards = [x for g in groups for x in g.rewards]
        responses = [x for g in groups for x in g.responses]

    # 2. training sequences (group-major) and micro-batches over all of them
    seqs, valid = zip(*(training_sequence(g.item.prompt.input_ids, x.token_ids, hf_config, pad_id)
                        for g in groups for x in g.responses))
    seqs, valid = list(seqs), torch.tensor(valid)
    prompts = [g.item.prompt for g in groups for _ in g.responses]
    mbs = micro_batches(seqs, prompts, list(range(len(seqs))), cfg, hf_config, pad_id)
    metrics |= batch_stats(mbs)

    # 3. old-policy (unless the update's forward gives them) and reference log-probs
    with timer("logprob"):
        old = None if old_from_update(len(seqs), cfg) else response_logprobs(policy, mbs, seqs, cfg.rollout.temperature)
        ref = response_logprobs(ref_model, mbs, seqs, cfg.rollout.temperature) if a.kl_coef > 0 else None

    # 4. advantages (KL in the reward: old policy against the reference, summed over each response)
    overall = torch.tensor([x["overall"] for x in rewards], dtype=torch.float64)
    if a.kl_in_reward and ref is not None:
        kl = torch.nn.utils.rnn.pad_sequence([kl_penalty(o, r, a.kl_type) for o, r in zip(old, ref)], True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(o)) for o in old], True).bool()
        penalized = kl_penalized_rewards(overall, kl.double(), mask, a.kl_coef)
        metrics["reward/kl_penalty"] = (overall - penalized).mean().item()
        overall = penalized
    advantages = group_advantages(overall, cfg.rollout.n, a.norm_adv_by_std, a.adv_eps)
    keep = overlong_keep([x.token_ids for x in responses], stop_id, cfg.rollout.max_tokens) if a.overlong_filter \
        else torch.ones(len(seqs), dtype=torch.bool)
    metrics |= {"advantages/abs_mean": advantages.abs().mean().item(), "overlong_dropped": int((~keep).sum()),
                "invalid_responses": int((~valid).sum())}

    # 5. update
    sampled = [torch.tensor(x.logprobs, dtype=torch.float32) for x in responses]  # the engine's, per sequence
    with timer("update"):
        update_metrics, update_old = update(policy, optimizer, seqs, prompts, old, ref, advantages, keep & valid,
                                            cfg, hf_config, pad_id, all_mbs=mbs, rollout=sampled)
    metrics |= update_metrics
    old = old if old is not None else update_old
    sampled = torch.cat(sampled)
    metrics |= logprob_mismatch(sampled, torch.cat(old), torch.cat([v.expand(len(o)) for v, o in zip(valid, old)]))

    # 6. weight sync
    with timer("sync"):
        engine.wake_up()
        stats = sync_weights(unwrap(policy), hf_config, engine, dtype=engine.dtype,
                             bucket_bytes=cfg.rollout.sync_bucket_bytes)
    metrics |= {"sync/bytes_sent": stats.bytes_sent, "sync/bytes_received": stats.bytes_received,
                "sync/bytes_per_rank": stats.bytes_sent + stats.bytes_received}  # this rank's traffic
    metrics |= rollout_stats(engine, timer)
    return metrics | timer.stats(tokens=sum(len(s) for s in seqs))


def rollout_stats(engine, timer) -> dict[str, float]:
    """``rollout/replicas`` (replicas that generated this step) and ``rollout/tokens_per_s_per_gpu`` (every
    replica's generated tokens over the step's rollout time and the world size), from ``rollout.placement``."""
    done = getattr(engine, "step_stats", None)
    if not done:
        return {}
    engine.step_stats = {}
    seconds = timer.seconds.get("rollout", 0.0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"rollout/replicas": done["replicas"],
            "rollout/tokens_per_s_per_gpu": done["tokens"] / seconds / world if seconds > 0 else 0.0}
