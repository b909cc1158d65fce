"""Per-rank bodies of the trainer tests: tiny end-to-end runs of ``tr1 train`` (``train_cli.train``) on a few
synthetic videos, stopped with a real SIGUSR1 and resumed."""
import json
import os
import shutil
import signal
from pathlib import Path

from megatron_tr1.rl.config import load_train_config

TINY_RUN = [
    "data.synthetic.num=8", "data.synthetic.num_test=4", "data.synthetic.num_ood=2", "data.synthetic.num_pretrain=4",
    "data.synthetic.size=56",
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=1",
    "model.tiny.vision_hidden_size=32", "model.tiny.vision_heads=2",
    "rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_tokens=12",
    "optim.micro_batch_size=4", "optim.global_batch_size=8", "optim.warmup_steps=2",
    "stages.base.steps=2", "stages.base.global_batch_size=8", "stages.sft.steps=4", "stages.sft.global_batch_size=8",
    "stages.sft.schedule=linear",
    "stages.grpo.steps=2", "stages.grpo_no_think.enabled=false",
    "logging.progress=false", "logging.tensorboard=false", "logging.plots=false", "checkpoint.keep_last=0",
]


def run_dir_config(run_dir, *extra):
    return load_train_config(None, TINY_RUN + [f"run_dir={run_dir}", *extra])


def _steady(record: dict) -> dict:
    """A metrics record without what depends on the wall clock: ``time/*`` dropped, rates (``*tokens_per_s*``)
    reduced to whether they are positive."""
    return {k: (v > 0 if "tokens_per_s" in k else v) for k, v in record.items() if not k.startswith("time/")}


def metrics(run_dir) -> dict:
    """Every stage's metrics.jsonl records without the wall-clock entries, and results.json."""
    out = {}
    for path in sorted(Path(run_dir, "stages").glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        out[path.parent.name] = [_steady(r) for r in records]
    results = Path(run_dir, "results.json")
    out["results"] = json.loads(results.read_text()) if results.is_file() else None
    return out


def stop_at(stage: str, step: int):
    """A callback that sends this process SIGUSR1 after ``stage``'s step ``step`` (the trainer's real handler)."""
    def callback(s, k, _metrics):
        if (s, k) == (stage, step):
            os.kill(os.getpid(), signal.SIGUSR1)
    return callback


def resume_case(rank, world, root):
    from megatron_tr1.rl.train_cli import train

    every = ("checkpoint.every=3", "eval.every=2")
    straight = train(run_dir_config(f"{root}/straight", *every))
    # the same videos for both runs: H.264 encoding is not byte-reproducible (data.video.write_video), and the
    # comparison is about training
    shutil.copytree(f"{root}/straight/data", f"{root}/resumed/data")
    first = train(run_dir_config(f"{root}/resumed", *every), callbacks=[stop_at("sft", 2)])
    ckpts = sorted(p.name for p in Path(root, "resumed/checkpoints/sft").iterdir())
    second = train(run_dir_config(f"{root}/resumed", *every), resume="auto", callbacks=[stop_at("grpo", 1)])
    third = train(run_dir_config(f"{root}/resumed", *every), resume="auto")
    return {"status": [straight, first, second, third], "sft_ckpts_after_stop": ckpts,
            "straight": metrics(f"{root}/straight"), "resumed": metrics(f"{root}/resumed"),
            "done": [Path(root, d, "DONE").is_file() for d in ("straight", "resumed")], "root": root}


def fresh_run_refuses_existing_checkpoints(rank, world, root):
    from megatron_tr1.errors import CheckpointError
    from megatron_tr1.rl.train_cli import train

    cfg = run_dir_config(root, "stages.sft.enabled=false", "stages.grpo.enabled=false")
    train(cfg, callbacks=[stop_at("base", 1)])
    try:
        train(cfg)
    except CheckpointError as e:
        return str(e)
    return None


def nan_case(rank, world, root):
    """Losses made NaN from the second step: the step is skipped (weights unchanged) and the third NaN in a
    row stops the run with TrainingDiverged."""

    from megatron_tr1.rl import sft
    from megatron_tr1.rl.guards import TrainingDiverged
    from megatron_tr1.rl.train_cli import train

    original = sft.sft_loss_fn
    calls = {"n": 0}

    def poisoned(batch, logprobs):
        calls["n"] += 1
        loss, stats = original(batch, logprobs)
        return (loss * float("nan"), stats) if calls["n"] > 2 else (loss, stats)  # 2 micro-batches per step
    sft.sft_loss_fn = poisoned
    seen = []
    try:
        train(run_dir_config(root, "stages.base.enabled=false", "stages.grpo.enabled=false",
                             "stages.sft.steps=6", "logging.max_nan_steps=3"),
              callbacks=[lambda s, k, m: seen.append((k, m["skipped"], m["grad_norm"]))])
    except TrainingDiverged as e:
        return {"error": str(e), "seen": [(k, s, g if g == g else None) for k, s, g in seen]}
    return {"error": None, "seen": seen}


def tp2_case(rank, world, root):
    """TP=2: SFT then GRPO (rollouts sampled on rank 0, shared with rank 1), stopped in GRPO after one step."""
    from megatron_tr1.rl.train_cli import train

    cfg = run_dir_config(root, "model.tensor_parallel=2", "stages.base.enabled=false", "stages.sft.steps=2",
                         "stages.grpo.steps=2")
    status = train(cfg, callbacks=[stop_at("grpo", 1)])
    return {"status": status, "metrics": metrics(root)}


def tp1_resume_case(rank, world, root, *extra):
    from megatron_tr1.errors import CheckpointError
    from megatron_tr1.rl.train_cli import train

    cfg = run_dir_config(root, "stages.base.enabled=false", "stages.sft.steps=2", "stages.grpo.steps=2", *extra)
    try:
        return {"status": train(cfg, resume="auto"), "metrics": metrics(root)}
    except CheckpointError as e:
        return {"error": str(e)}


def layout_case(rank, world, root, tp, pp):
    """SFT (2 steps) then GRPO (1 step) at TP x PP, 2 LM layers; the metrics rank 0 logged."""
    from megatron_tr1.rl.train_cli import train

    cfg = run_dir_config(root, f"model.tensor_parallel={tp}", f"model.pipeline_parallel={pp}",
                         "model.tiny.num_layers=2", "stages.base.enabled=false", "stages.sft.steps=2",
                         "stages.grpo.steps=1", "logging.progress=false")
    return {"status": train(cfg), "metrics": metrics(root)}


def engine_sleep_case(rank, world, root):
    """Base (2 steps), SFT (2) and GRPO (2) with ``eval.every=1``: whether the rollout engine was awake at every
    training forward-backward (must not be), every ``generate`` and every weight load (must be)."""
    from megatron_tr1.rl import grpo, sft
    from megatron_tr1.rl.train_cli import train
    from megatron_tr1.rollout.hf_engine import HFEngine

    state = {"awake": True}  # an engine starts awake (vLLM holds its memory from construction)
    seen = {"train": [], "generate": [], "load": []}
    originals = {name: getattr(HFEngine, name) for name in ("sleep", "wake_up", "generate", "update_weights")}

    def spy(name, key=None, awake=None):
        def method(self, *args, **kwargs):
            if key is not None:
                seen[key].append(state["awake"])
            if awake is not None:
                state["awake"] = awake
            return originals[name](self, *args, **kwargs)
        return method

    def training(module):
        original = module.forward_backward

        def forward_backward(*args, **kwargs):
            if not kwargs.get("forward_only"):
                seen["train"].append(state["awake"])
            return original(*args, **kwargs)
        module.forward_backward = forward_backward
        return module, original

    patched = [training(sft), training(grpo)]
    HFEngine.sleep, HFEngine.wake_up = spy("sleep", awake=False), spy("wake_up", awake=True)
    HFEngine.generate, HFEngine.update_weights = spy("generate", "generate"), spy("update_weights", "load")
    try:
        status = train(run_dir_config(root, "stages.grpo.steps=2", "eval.every=1", "eval.max_samples=2"))
    finally:
        for name, fn in originals.items():
            setattr(HFEngine, name, fn)
        for module, original in patched:
            module.forward_backward = original
    return {"status": status, "seen": seen, "awake_at_end": state["awake"]}


def qwen3_vl_run_case(rank, world, root):
    """A short ``tr1 train`` (base, SFT, GRPO) on the demo's tiny model built as Qwen3-VL; its GRPO records and the
    folder's model_type."""
    from megatron_tr1.rl.train_cli import train

    train(run_dir_config(root, "model.tiny.family=qwen3_vl", "eval.seed_protocols=false", "eval.videoqa=false"))
    records = [json.loads(line) for line in Path(root, "stages/grpo/metrics.jsonl").read_text().splitlines()]
    model_type = json.loads(Path(root, "model_init/config.json").read_text())["model_type"]
    return {"grpo": records, "model_type": model_type, "results": json.loads(Path(root, "results.json").read_text())}
