"""Per-rank bodies of the every-rank rollout tests: tiny ``tr1 train`` runs at several layouts."""
from pathlib import Path

from tests.rl import _trainer_cases

GRPO_ONLY = ("stages.base.enabled=false", "stages.sft.enabled=false", "stages.grpo.steps=2",
             "eval.max_samples=2")


def final_weights(run_dir) -> dict:
    """The GRPO stage's final weights (the first rank's shard), as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir, "stages/grpo/model/mp_rank_00_000/model.safetensors")))


def train_case(rank, world, root, *extra):
    from megatron_tr1.rl.train_cli import train

    cfg = _trainer_cases.run_dir_config(root, *GRPO_ONLY, *extra)
    status = train(cfg)
    return {"status": status, "metrics": _trainer_cases.metrics(root),
            "weights": final_weights(root) if rank == 0 else None}
