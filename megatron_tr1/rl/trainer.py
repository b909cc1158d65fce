"""``tr1 train``: the stages of a run, each a loop of SFT or GRPO steps with checkpoints, logging and evaluation.

A run (``RUN_DIR``) executes the enabled stages of ``cfg.stages`` in order ``base, sft, grpo, grpo_no_think``:

- ``base``: pretraining on related video-text work without the train split's grounding labels, half of it with
  the think template: grounding on the ``pretrain`` split (other event kinds, their own labels) when the data
  have one - the demo's do, as a real VLM is pretrained on other grounding data - else the train videos with
  spans drawn at random inside the video (``random_span``), which teaches the format only.
- ``sft``: cross-entropy on the ground-truth answers (``rl.sft``); ``grpo`` / ``grpo_no_think``: ``rl.grpo``.
  Each starts from the base stage's final weights when ``base`` ran, else from ``model.hf_dir``.

Per stage: ``RUN_DIR/stages/<stage>/`` holds ``metrics.jsonl``, ``tensorboard/``, ``model/`` (final weights,
tr1 Megatron layout: ``tr1 convert mcore-to-hf`` or ``tr1 eval --model`` read it), ``eval/<split>/`` and ``DONE``.
Checkpoints: ``checkpoint.dir/<stage>/step_N`` (``rl.checkpoint``: atomic, checksummed), with the model
shards, each rank's optimizer shard and RNG (``rl.optimizer_state``), and the trainer state (step, data position,
NaN guard, metrics); saving, loading and choosing one to resume is ``rl.stage_checkpoint``. SIGUSR1 / SIGTERM:
the current step finishes, a checkpoint is saved, and the run returns ``"interrupted"`` (``RUN_DIR/DONE`` is
written only when every stage is done).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_tr1.backend import Backend, resolve
from megatron_tr1.config import save_config
from megatron_tr1.convert.weights import load_weights, nonfinite, save_weights
from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.prompt_cache import PromptCache
from megatron_tr1.distributed import barrier as _barrier, is_rank0 as _rank0
from megatron_tr1.errors import CheckpointError, DataError
from megatron_tr1.rl import stage_checkpoint
from megatron_tr1.rl.checkpoint import CheckpointManager, TrainState
from megatron_tr1.rl.config import STAGES, TrainConfig
from megatron_tr1.rl.guards import NanGuard, TrainingDiverged
from megatron_tr1.rl.logger import MetricsLogger, ProgressBar
from megatron_tr1.rl.policy import build_policy
from megatron_tr1.rl.prompts import GroundingPrompt, grounding_item, task_prompts
from megatron_tr1.rl.sampler import PromptSampler, shard
from megatron_tr1.rl.stage_eval import StageEvaluator
from megatron_tr1.rl.update import unwrap
from megatron_tr1.models.qwen2_5_vl.size import Dims
from megatron_tr1.rollout.placement import ReplicaLayout, RolloutPlacement

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DONE = "DONE"


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    ``constant``, ``linear`` or ``cosine`` decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - frac)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def random_span(sample: Sample, seed: int) -> tuple[float, float]:
    """A span drawn uniformly inside ``sample``'s video (ends sorted, at least 0.5 s): the base stage's answer."""
    rng = random.Random(seed)
    a, b = sorted(rng.uniform(0, sample.duration) for _ in range(2))
    if b - a < 0.5:
        a, b = max(0.0, min(a, sample.duration - 0.5)), min(sample.duration, max(b, a + 0.5))
    return round(a, 2), round(b, 2)


class StopFlag:
    """Set by SIGUSR1 / SIGTERM; ``requested()`` agrees across ranks (one all-reduce)."""

    def __init__(self):
        self.flag = False
        self._previous = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)
        self.flag = True

    def requested(self) -> bool:
        value = torch.tensor(float(self.flag))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)


def _world_max(value: int) -> int:
    """The largest ``value`` over all ranks (one all-reduce; ``value`` itself without a process group)."""
    t = torch.tensor([value], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _from_last_stage(metrics: dict) -> dict:
    """The last pipeline stage's metrics on every stage (loss, log-prob statistics exist only there)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    group = ps.get_pipeline_model_parallel_group()
    box = [metrics]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[-1], group=group)
    return box[0]


class Trainer:
    """Runs the stages of ``cfg`` in ``run_dir`` given the data (``samples``: split -> list of ``Sample``), the HF
    folder ``hf_dir`` (config, tokenizer) and the first weights ``init_weights`` (default ``hf_dir``; an HF folder
    or a tr1 Megatron checkpoint). Call after ``distributed.init_parallel``; ``backend`` is its result.

    Every rank is a rollout worker (``rollout.placement``): vLLM with ``rollout.tensor_parallel`` ranks per
    replica (default ``model.tensor_parallel``) under ``external_launcher``, or one HF engine per rank; a step's
    prompts are spread over all replicas and every rank gets its own prompts' responses. The engines sleep (on GPU:
    hand their memory to training) except to take weights, generate and evaluate: ``wake_up`` -> ``sync_weights``
    before a GRPO stage's first step and before evaluating a stage that did not generate (base, SFT);
    ``grpo_step`` sleeps them after its rollouts and wakes them for its closing sync; the end of every stage puts
    them back to sleep. They are built without weights (``load_format="dummy"`` for vLLM, random for HF): every
    use follows a sync."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, hf_dir: Path, samples: dict[str, list[Sample]],
                 resume: str | None = None, callbacks=(), backend: Backend | None = None,
                 init_weights: Path | None = None):
        from megatron_tr1.convert.model_dir import load_hf_config_and_tokenizer
        from megatron_tr1.rollout.factory import make_engine

        self.cfg, self.run_dir, self.hf_dir, self.samples = cfg, Path(run_dir), Path(hf_dir), samples
        self.init_weights = Path(init_weights) if init_weights is not None else self.hf_dir
        self.backend = backend or resolve(cfg.model.layer_spec, cfg.model.dtype)
        self.resume, self.callbacks = resume, list(callbacks)
        self.hf_config, self.tokenizer = load_hf_config_and_tokenizer(hf_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.dp = ps.get_data_parallel_world_size()
        self.stop = StopFlag()
        kwargs, rollout_tp = {}, 1  # the HF engine: each rank one whole replica
        if cfg.rollout.engine == "vllm":
            rollout_tp = cfg.rollout.tensor_parallel or cfg.model.tensor_parallel
            dims = Dims.from_hf_config(self.hf_config, source=str(hf_dir / "config.json"))
            # vLLM splits heads, query groups and the vocabulary as megatron does; a vision tower the rollout TP
            # does not divide (Qwen2.5-VL's FFN of 3420 at TP 8) runs data-parallel in vLLM: whole on each rank
            dims.validate(rollout_tp, 1, "rollout.tensor_parallel={}", "", vision=False)
            if vision_dp := bool(dims.vision_splits(rollout_tp)):
                log.info("rollout.tensor_parallel=%d does not divide %s: vLLM runs the vision tower whole on every "
                         "rank", rollout_tp, ", ".join(dims.vision_splits(rollout_tp)))
            kwargs.update(model_dir=str(hf_dir), load_format="dummy", seed=cfg.seed, tensor_parallel=rollout_tp,
                          gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, vision_data_parallel=vision_dp,
                          max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_tokens)
            if cfg.rollout.max_num_seqs:
                kwargs["max_num_seqs"] = cfg.rollout.max_num_seqs
        layout = ReplicaLayout.current(rollout_tp)
        self.engine = make_engine(cfg.rollout.engine, self.hf_config, self.tokenizer, self.backend, **kwargs)
        # one cache of decoded videos for training and evaluation
        self.prompt_cache = PromptCache(self.tokenizer, self.hf_config, cfg.data.video, cfg.data.cache_gb)
        self.rollout = RolloutPlacement(self.engine, layout, self.prompt_cache.from_key,
                                        ps.get_data_parallel_rank(), self.dp)
        self.rollout.sleep()  # until a stage needs it
        self.evaluator = StageEvaluator(cfg, self.rollout, samples, self.prompt_cache)

    # ---------------------------------------------------------------- data
    def prompts(self, split: str, indices: list[int], think: bool) -> list[GroundingPrompt | None]:
        """Grounding prompts of ``split``'s samples ``indices`` (``self.prompt_cache``: a video is decoded once
        while it is kept; the other prompt mode and other queries on it reuse its frames); None for a sample whose
        video cannot be decoded (warned once, counted in ``prompt_cache.skipped``)."""
        samples = [self.samples[split][i] for i in indices]
        return [None if p is None else grounding_item(s, p, self.cfg.data.max_prompt_tokens, think)
                for s, p in zip(samples, task_prompts(self.prompt_cache, samples, think))]

    def skipped_samples(self) -> int:
        """Samples left out so far (undecodable videos), summed over the data-parallel ranks."""
        t = torch.tensor([sum(self.prompt_cache.skipped.values())], dtype=torch.long)
        if dist.is_initialized() and self.dp > 1:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        return int(t.item())

    def draw(self, sampler: PromptSampler, k: int, make) -> list[GroundingPrompt]:
        """This rank's ``k`` items: its data-parallel shard of the next ``k x DP`` sampled indices through
        ``make(indices)``; a sample left out (None: an undecodable video) is replaced by the next ones. Every rank
        takes the same number of indices from its sampler (they agree on the most any rank still lacks, one
        all-reduce), so sampler positions stay equal across ranks and a resumed run draws the same prompts."""
        rank, items, dry = ps.get_data_parallel_rank(), [], 0
        while lacking := _world_max(k - len(items)):
            got = [x for x in make(shard(sampler.take(lacking * self.dp), rank, self.dp)) if x is not None]
            items += got[: k - len(items)]
            dry = dry + 1 if not got else 0
            if dry * lacking * self.dp > sampler.num:  # a whole epoch's worth of draws gave nothing
                raise DataError(f"no decodable video in {sampler.num} samples of the training data "
                                f"({dict(self.prompt_cache.skipped)}); check data.train and the video folders")
        return items

    def base_split(self) -> str:
        """What the base stage trains on: ``pretrain`` (with its labels) when the data have it, else ``train``."""
        return "pretrain" if self.samples.get("pretrain") else "train"

    def stage_split(self, stage: str) -> str:
        return self.base_split() if stage == "base" else "train"

    def base_items(self, indices: list[int], step: int, think: bool) -> list[GroundingPrompt]:
        """Base-stage items: ``pretrain`` samples with their labels, or train videos whose answer is a random
        span (``random_span``), not the label."""
        if self.base_split() == "pretrain":
            return self.prompts("pretrain", indices, think)
        items = self.prompts("train", indices, think)
        return [None if item is None else dataclasses.replace(
                    item, gt=random_span(self.samples["train"][i], self.cfg.seed * 1_000_003 + step * 4099 + k))
                for k, (i, item) in enumerate(zip(indices, items))]

    # ---------------------------------------------------------------- stages
    def stage_think(self, stage: str) -> bool:
        if stage == "grpo_no_think":
            return False
        think = getattr(self.cfg.stages, stage).think
        return self.cfg.algorithm.think if think is None else think

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / "stages" / stage

    def run(self) -> str:
        """Run every enabled stage not yet done; returns ``"done"`` or ``"interrupted"``."""
        self.stop.install()
        try:
            for stage in STAGES:
                if not getattr(self.cfg.stages, stage).enabled:
                    continue
                if (self.stage_dir(stage) / DONE).is_file():
                    log.info("stage %s: already done (%s), skipping", stage, self.stage_dir(stage) / DONE)
                    continue
                if self.run_stage(stage) == "interrupted":
                    return "interrupted"
            return "done"
        finally:
            self.stop.uninstall()
            if self.prompt_cache.skipped:
                counts = ", ".join(f"{n} {why}" for why, n in self.prompt_cache.skipped.most_common())
                log.warning("rank %d skipped %d samples (%s) of %d videos that could not be decoded; the warnings "
                            "above name the files", dist.get_rank() if dist.is_initialized() else 0,
                            sum(self.prompt_cache.skipped.values()), counts, len(self.prompt_cache.bad))

    def init_source(self, stage: str) -> Path:
        base = self.stage_dir("base") / "model"
        if stage != "base" and self.cfg.stages.base.enabled:
            if not (self.stage_dir("base") / DONE).is_file():
                raise CheckpointError(f"stage {stage} starts from the base stage, which has not finished "
                                      f"({self.stage_dir('base')})")
            return base
        return self.init_weights

    def sync_engine(self, model) -> None:
        """Wake the engine and push ``model``'s weights into it (collective over the model-parallel group)."""
        from megatron_tr1.rollout.weight_sync import sync_weights

        self.rollout.wake_up()
        return sync_weights(unwrap(model), self.hf_config, self.engine, dtype=self.backend.dtype,
                            bucket_bytes=self.cfg.rollout.sync_bucket_bytes)

    def run_stage(self, stage: str) -> str:
        from megatron_tr1.distributed import wrap_ddp_and_optimizer

        cfg, sc = self.cfg, getattr(self.cfg.stages, stage)
        grpo = stage.startswith("grpo")
        think = self.stage_think(stage)
        out = self.stage_dir(stage)
        per_step = cfg.rollout.prompts_per_step if grpo else cfg.stage_batch(stage)
        total = sc.total_steps(len(self.samples[self.stage_split(stage)]), per_step)
        lr = sc.lr or cfg.optim.lr
        model = build_policy(self.hf_config, cfg.model, self.backend)
        load_weights(model, self.init_source(stage))
        (policy,), optimizer = wrap_ddp_and_optimizer(
            [model], lr, cfg.optim.weight_decay, cfg.optim.grad_clip, adam_beta1=cfg.optim.betas[0],
            adam_beta2=cfg.optim.betas[1], adam_eps=cfg.optim.eps)
        ref = None
        if grpo and cfg.algorithm.kl_coef > 0:
            ref = build_policy(self.hf_config, cfg.model, self.backend)
            load_weights(ref, self.init_source(stage))
            ref.eval().requires_grad_(False)
        manager = CheckpointManager(self.ckpt_root / stage, cfg.checkpoint.keep_last)
        state, guard = TrainState(), NanGuard(cfg.logging.max_nan_steps)
        resume_from = stage_checkpoint.resume_path(self.resume, stage, manager)
        if resume_from is not None:
            state = stage_checkpoint.load(resume_from, model, optimizer, cfg.checkpoint.reset_optimizer)
            guard.load_state_dict(state.extra.get("nan_guard", guard.state_dict()))
            log.info("stage %s: resumed from %s at step %d", stage, resume_from, state.step)
        elif manager.complete():
            raise CheckpointError(f"{manager.root} already has checkpoints ({manager.latest().name}); pass "
                                  f"--resume auto to continue that run, or choose another --run-dir")
        sampler = PromptSampler(len(self.samples[self.stage_split(stage)]), cfg.seed, cfg.data.shuffle, state.epoch,
                                state.index)
        if grpo:
            self.sync_engine(policy)  # awake from here to the stage's end, but during the updates (grpo_step)
        logger = MetricsLogger(out, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                               wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                               resume_step=state.step if resume_from is not None else None) if _rank0() else None
        if _rank0():
            save_config(cfg, out / "config.yaml")
        bar = ProgressBar(total, f"{stage}", initial=state.step, enabled=cfg.logging.progress and _rank0())
        status = "done"
        try:
            while state.step < total:
                step_lr = lr_at(state.step, total, lr, cfg.optim.min_lr * lr / cfg.optim.lr,
                                cfg.optim.warmup_steps, sc.schedule or cfg.optim.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = step_lr * group.get("lr_mult", 1.0)
                start = time.perf_counter()
                if grpo:
                    metrics = self.grpo_step(policy, optimizer, ref, sampler, state.step, think)
                else:
                    metrics = self.sft_step(policy, optimizer, sampler, stage, state.step, think)
                metrics = _from_last_stage(metrics) | {"lr": step_lr, "time/total": time.perf_counter() - start}
                try:
                    applied = guard.check(metrics.get("loss", 0.0) if math.isfinite(metrics.get("grad_norm", 0.0))
                                          else float("nan"), state.step)
                except TrainingDiverged as e:
                    raise TrainingDiverged(f"{e}; the newest checkpoint saved after a finite loss: "
                                           f"{manager.latest_healthy() or 'none'}") from None
                metrics["skipped"] = int(not applied)
                metrics["data/skipped_samples"] = self.skipped_samples()
                state.step += 1
                if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < total:
                    if not grpo:  # a GRPO step leaves the engine awake with the updated weights
                        self.sync_engine(policy)
                    metrics |= self.evaluator.during_training(think)
                    if not grpo:
                        self.rollout.sleep()
                state.epoch, state.index = sampler.position
                if logger is not None:
                    state.metrics.append(logger.log(state.step, metrics))
                bar.update(metrics)
                for callback in self.callbacks:
                    callback(stage, state.step, metrics)
                stop = self.stop.requested()
                every = cfg.checkpoint.every
                if stop or (every and state.step % every == 0 and state.step < total):
                    self.save_checkpoint(manager, state, model, optimizer, guard)
                if stop:
                    status = "interrupted"
                    log.warning("stage %s: stopped at step %d; resume with --resume auto", stage, state.step)
                    return status
            self.save_checkpoint(manager, state, model, optimizer, guard)
            self.finish_stage(stage, model, state, think)
            return status
        finally:
            self.rollout.sleep()
            bar.close()
            if logger is not None:
                logger.close()

    # ---------------------------------------------------------------- steps
    def sft_step(self, policy, optimizer, sampler: PromptSampler, stage: str, step: int, think: bool) -> dict:
        from megatron_tr1.rl.sft import sft_step

        k = self.cfg.stage_batch(stage) // self.dp
        if stage == "base":  # both prompt modes, alternating by step (one mode per step: one sft_step call)
            think = step % 2 == 0
            items = self.draw(sampler, k, lambda indices: self.base_items(indices, step, think))
        else:
            items = self.draw(sampler, k, lambda indices: self.prompts("train", indices, think))
        return sft_step(policy, optimizer, items, self.cfg, self.tokenizer, self.hf_config, think=think,
                        sync=self.backend.sync)

    def grpo_step(self, policy, optimizer, ref, sampler: PromptSampler, step: int, think: bool) -> dict:
        from megatron_tr1.rl.grpo import grpo_step

        def draw(k: int) -> list[GroundingPrompt]:
            return self.draw(sampler, k, lambda indices: self.prompts("train", indices, think))

        items = draw(self.cfg.rollout.prompts_per_step // self.dp)
        return grpo_step(policy, optimizer, self.rollout, ref, items, self.cfg, self.tokenizer, self.hf_config,
                         step=step, think=think, refill=draw, sync=self.backend.sync)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, manager: CheckpointManager, state: TrainState, model, optimizer, guard: NanGuard):
        state.extra["nan_guard"] = guard.state_dict()
        return stage_checkpoint.save(manager, state, model, optimizer, self.hf_dir, healthy=guard.consecutive == 0)

    # ---------------------------------------------------------------- end of stage
    def finish_stage(self, stage: str, model, state: TrainState, think: bool) -> None:
        """Final weights to ``stages/<stage>/model``, evaluation, plots, ``DONE``."""
        out = self.stage_dir(stage)
        if not stage_checkpoint.all_ranks(not nonfinite(model)):
            raise TrainingDiverged(f"stage {stage}: the weights hold NaN or inf at its end; not writing "
                                   f"{out / 'model'}")
        if not stage.startswith("grpo"):  # a GRPO stage's last step left its weights in the engine
            self.sync_engine(model)  # the engine evaluates
        tmp = out / "model.tmp"
        save_weights(model, tmp, self.hf_dir)
        _barrier()
        results = self.evaluator.final(stage, think, out / "eval", write=_rank0())  # every rank: collective
        if _rank0():
            import shutil
            shutil.rmtree(out / "model", ignore_errors=True)
            tmp.rename(out / "model")
            (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
            if self.cfg.logging.plots:
                from megatron_tr1.rl.plots import plot_training
                plot_training({stage: state.metrics}, out / "plots")
            (out / DONE).write_text(f"step {state.step}\n")
        _barrier()
