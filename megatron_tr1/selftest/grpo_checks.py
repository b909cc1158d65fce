"""A 3-step GRPO run through the real entry point (``rl.train_cli.train``: synthetic data, the demo's tiny model
folder, the Trainer with megatron DDP + distributed optimizer, HF rollouts, weight sync, final eval and
checkpoint) in a temporary run folder, removed afterwards.

Config: tests/rl's TINY_RUN (8 synthetic 56 px videos, a 1-layer tiny model, 2 prompts x 4 responses of at most
12 tokens per step) with only the ``grpo`` stage, 3 steps, dynamic sampling off (a random model earns no reward,
so it would resample every group), 2 test videos for the final eval. Passes when the run finishes, 3 steps were
logged, every metric is finite, some step had a non-zero gradient and every step's ``logprob_mismatch/max``
(engine vs trainer log-probs of the sampled tokens) is within tolerance: 1e-4 in fp32 (tests/rl measure ~1e-6);
5e-2 in bf16, where the engine and the trainer each round to bf16 (on this model's small logits the expected
mismatch is ~1e-3; a missed sync of random weights gives O(1)).

``tp=2`` runs on two ranks (one per GPU); the run folder is rank 0's, broadcast to the other rank.
"""
from __future__ import annotations

import math
import shutil
import tempfile

from megatron_tr1.selftest import common
from megatron_tr1.selftest.registry import Measured

STEPS = 3
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
TINY_GRPO = [
    "data.synthetic.num=8", "data.synthetic.num_test=2", "data.synthetic.num_ood=0", "data.synthetic.num_pretrain=0",
    "data.synthetic.size=56",
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=1",
    "model.tiny.vision_hidden_size=32", "model.tiny.vision_heads=2",
    "rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_tokens=12", "rollout.engine=hf",
    "optim.micro_batch_size=4", "optim.global_batch_size=8", "optim.warmup_steps=2",
    "algorithm.dynamic_sampling=false",
    "stages.base.enabled=false", "stages.sft.enabled=false", f"stages.grpo.steps={STEPS}",
    "stages.grpo_no_think.enabled=false", "eval.max_samples=2",
    "logging.progress=false", "logging.tensorboard=false", "logging.plots=false", "checkpoint.keep_last=1",
]
DTYPE_OVERRIDES = {"fp32": ["model.dtype=fp32", "model.layer_spec=local"], "bf16": ["model.dtype=bf16"]}


def _shared_run_dir() -> str:
    """A fresh temporary folder, the same on every rank (rank 0's)."""
    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="tr1-selftest-grpo-") if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(path, src=0)
    return path[0]


def _finite(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v)]


def grpo_three_steps(dtype: str = "fp32", tp: int = 1) -> Measured:
    import torch.distributed as dist

    from megatron_tr1.rl.config import load_train_config
    from megatron_tr1.rl.train_cli import train

    common.check_backend(dtype)  # refuses bf16 without a GPU; fp32 on a GPU: TF32 off
    root = _shared_run_dir()
    try:
        cfg = load_train_config(None, TINY_GRPO + DTYPE_OVERRIDES[dtype] + [f"run_dir={root}",
                                                                             f"model.tensor_parallel={tp}"])
        steps: list[dict] = []
        status = train(cfg, callbacks=[lambda stage, step, m: steps.append(dict(m, stage=stage, step=step))])
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    grpo = [m for m in steps if m["stage"] == "grpo"]
    mismatch = max((m.get("logprob_mismatch/max", math.inf) for m in grpo), default=math.inf)
    bad = sorted({k for m in grpo for k in _finite(m)})
    tol = TOLERANCE[dtype]
    keep = ("loss", "grad_norm", "reward/mean", "kl", "entropy", "logprob_mismatch/mean", "logprob_mismatch/max",
            "time/step")
    numbers = {"status": status, "steps": len(grpo), "tp": tp, "non_finite": bad,
               "per_step": [{k: m[k] for k in keep if k in m} for m in grpo]}
    problems = ([] if status == "done" else [f"run {status}"]) + \
        ([] if len(grpo) == STEPS else [f"{len(grpo)} of {STEPS} steps"]) + \
        ([f"non-finite {', '.join(bad)}"] if bad else []) + \
        ([] if any(m.get("grad_norm", 0) > 0 for m in grpo) else ["zero gradient at every step"])
    value = f"mismatch {mismatch:.2e}" + "".join(f"; {p}" for p in problems)
    return Measured(value, f"mismatch <= {tol:g}; 3 finite steps, grad > 0",
                    mismatch <= tol and not problems, numbers)
