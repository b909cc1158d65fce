"""``tr1 train``: load the config, prepare data and the starting model, run the stages, report the results.

``tr1 train`` with no ``--config`` runs the embedded CPU demo (``examples/synthetic_tiny.yaml`` = the defaults of
``rl.config.TrainConfig``): synthetic data and a tiny model folder are written under the run folder first.
Multi-process: ``torchrun --nproc-per-node N -m megatron_tr1.cli train --config FILE``; alone, ``tr1 train``
runs as a single process (world size 1). On completion ``RUN_DIR/results.json`` holds, per trained stage, the
in-domain test metrics (``mIoU``, ``R@0.3/0.5/0.7`` in percent, ``n``), the same under ``"ood"``, and under
``"protocols"`` each stage's scores under the seed's protocols (``{stage: {protocol: {split: metrics}}}``, the rows
of the seed's table: ``rl.stage_eval.SEED_PROTOCOLS``);
``RUN_DIR/DONE`` marks a finished run. SIGUSR1 / SIGTERM save a checkpoint and exit 0 without ``DONE``.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path

import torch.distributed as dist

from megatron_tr1.distributed import barrier as _barrier, is_rank0 as _rank0, single_process_env
from megatron_tr1.errors import ConfigError
from megatron_tr1.rl.config import STAGES, TrainConfig, check_layout, load_train_config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="train config YAML (default: the embedded CPU demo)")
    parser.add_argument("--run-dir", help="output folder (overrides run_dir)")
    parser.add_argument("--resume", help="'auto': continue from the newest complete checkpoint (or start fresh); "
                                         "or a checkpoint folder RUN/checkpoints/<stage>/step_N")
    parser.add_argument("--stages", help=f"comma-separated stages to run, of {','.join(STAGES)} (default: the "
                                         f"config's enabled ones)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def build_config(args) -> TrainConfig:
    overrides = list(args.overrides or [])
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_train_config(args.config, overrides)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ConfigError(f"--stages {args.stages}: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
        for stage in STAGES:
            getattr(cfg.stages, stage).enabled = stage in wanted
    if not any(getattr(cfg.stages, s).enabled for s in STAGES):
        raise ConfigError("no stage is enabled; enable one in stages.* or pass --stages")
    return cfg


def prepare_data(cfg: TrainConfig, run_dir: Path) -> dict[str, list]:
    """The train / test / ood / pretrain samples: ``data.*`` configs, or synthetic data written to
    ``RUN_DIR/data``."""
    from megatron_tr1.data import synthetic
    from megatron_tr1.data.dataset import load_data_config, load_samples

    paths = {"train": cfg.data.train, "test": cfg.data.test, "ood": cfg.data.ood, "pretrain": cfg.data.pretrain}
    if cfg.data.train is None:
        folder, s = run_dir / "data", cfg.data.synthetic
        if _rank0() and not (folder / "meta.json").is_file():
            synthetic.generate(folder, s.num, seed=s.seed, size=s.size, num_test=s.num_test, num_ood=s.num_ood,
                               num_pretrain=s.num_pretrain, duration=tuple(s.duration),
                               progress=cfg.logging.progress)
        _barrier()
        paths = {split: str(folder / f"{split}.yaml") if n else None
                 for split, n in (("train", s.num), ("test", s.num_test), ("ood", s.num_ood),
                                  ("pretrain", s.num_pretrain))}
    samples = {}
    for split, path in paths.items():
        if path is not None:  # evaluated splits keep every label as written, as the seed's scorer reads them
            labels = "verbatim" if split in ("test", "ood") else "checked"
            annotations = load_samples(load_data_config(path), seed=cfg.seed, strict=cfg.data.strict, labels=labels)
            samples[split] = annotations.samples
            check_split_tasks(cfg, split, path, annotations.samples)
            if _rank0():
                tasks = collections.Counter(x.task for x in annotations.samples)
                notes = " ".join(x for x in (annotations.summary(), annotations.notes_summary()) if x)
                log.info("data.%s: %d samples (%s) from %s%s", split, len(annotations.samples),
                         ", ".join(f"{t} {n}" for t, n in sorted(tasks.items())), path, f"; {notes}" if notes else "")
    if cfg.eval.videoqa:
        samples |= videoqa_splits(cfg, run_dir / "data" if cfg.data.train is None else None)
    return samples


def videoqa_splits(cfg: TrainConfig, synthetic_folder: Path | None) -> dict[str, list]:
    """``mc_test`` / ``mc_ood``: the multiple-choice records of ``eval.videoqa_test`` / ``eval.videoqa_ood`` (MVBench
    layout, as ``tr1 eval --task mvbench`` reads them), or of the demo's synthetic splits when those are null."""
    from megatron_tr1.eval import mvbench

    out = {}
    for split, path in (("mc_test", cfg.eval.videoqa_test), ("mc_ood", cfg.eval.videoqa_ood)):
        if path is None and synthetic_folder is not None and (synthetic_folder / f"{split}.yaml").is_file():
            path = str(synthetic_folder / f"{split}.yaml")
        if path is not None:
            out[split] = mvbench.load_config(path, seed=cfg.seed, strict=cfg.data.strict).samples
    return out


def check_split_tasks(cfg: TrainConfig, split: str, path: str, samples) -> None:
    """Each sample's task exists (``megatron_tr1.tasks``); tasks other than grounding only where the run handles
    them: GRPO on ``data.train`` (each group its task's reward), never the evaluated splits (the stages score
    grounding; ``tr1 eval --task mvbench`` scores VideoQA) nor SFT / base (their targets are grounding spans)."""
    from megatron_tr1.tasks import DEFAULT, check_tasks

    others = sorted(set(check_tasks(samples, f"data.{split} ({path})")) - {DEFAULT})
    if not others:
        return
    stages = [s for s in ("base", "sft") if getattr(cfg.stages, s).enabled]
    if split != "train" or (stages and not (stages == ["base"] and cfg.data.pretrain)):
        where = f"data.{split}" if split != "train" else f"stages {', '.join(stages)} (train on data.train)"
        raise ConfigError(f"data.{split} ({path}) holds {', '.join(others)} samples, which {where} cannot use: "
                          f"only GRPO stages train other tasks than {DEFAULT} and the stages evaluate grounding "
                          "only (evaluate VideoQA with `tr1 eval --task mvbench`); set their datasets' task or "
                          "disable stages.base.enabled / stages.sft.enabled")


def prepare_model(cfg: TrainConfig, run_dir: Path) -> tuple[Path, Path]:
    """``(HF folder with config and tokenizer, first weights)``: ``model.hf_dir`` (an HF folder, or a tr1 Megatron
    checkpoint and its ``hf/``), or the demo's tiny random model written to ``RUN_DIR/model_init``."""
    if cfg.model.hf_dir is not None:
        from megatron_tr1.convert.model_dir import check_model_dir, load_hf_config_and_tokenizer

        # before any model is built: model_type, config.json's sizes, the weights' presence (for a tr1 checkpoint:
        # its rank files; its hf/ side folder has none), then the tokenizer. One clear error naming model.hf_dir.
        hf_dir, weights = check_model_dir(cfg.model.hf_dir, "model.hf_dir")
        load_hf_config_and_tokenizer(hf_dir, "model.hf_dir")
        return hf_dir, weights
    from megatron_tr1.demo import write_demo_model_dir

    folder = run_dir / "model_init"
    if _rank0():
        write_demo_model_dir(cfg.model.tiny, folder, seed=cfg.seed)
    _barrier()
    return folder, folder


def collect_results(run_dir: Path) -> dict:
    """``{stage: test metrics, ..., "ood": {stage: ood metrics}, "protocols": {stage: {protocol: {split:
    metrics}}}, "videoqa": {stage: {split: accuracy}}}`` from the finished stages."""
    results: dict = {}
    for stage in STAGES:
        path = run_dir / "stages" / stage / "results.json"
        if path.is_file():
            stage_results = json.loads(path.read_text())
            if "test" in stage_results:
                results[stage] = stage_results["test"]
            if "ood" in stage_results:
                results.setdefault("ood", {})[stage] = stage_results["ood"]
            for key in ("protocols", "videoqa"):
                if key in stage_results:
                    results.setdefault(key, {})[stage] = stage_results[key]
    return results


# The seed's table: (row label, stage, protocol); our grpo_no_think (a separately trained model) is an extra row.
SEED_ROWS = (("base (custom)", "base", "custom"), ("SFT (custom)", "sft", "custom"),
             ("GRPO, think ✗ (custom)", "grpo", "custom"), ("GRPO, think ✓ (r1)", "grpo", "r1"))


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mIoU / R@0.3 / R@0.5 / R@0.7 (%), greedy")
    for col in ("model", "in domain (test)", "out of domain (ood)"):
        table.add_column(col)

    def cell(m):
        return "-" if m is None else f"{m['mIoU']:.1f} / {m['R@0.3']:.1f} / {m['R@0.5']:.1f} / {m['R@0.7']:.1f}"
    for stage in STAGES:
        if stage in results or stage in results.get("ood", {}):
            table.add_row(stage, cell(results.get(stage)), cell(results.get("ood", {}).get(stage)))
    Console().print(table)
    protocols = results.get("protocols") or {}
    if not protocols:
        return
    seed = Table(title="The seed's table: its protocols (custom / R1 inference, lmms-eval scoring)")
    for col in ("model", "in domain (test)", "out of domain (ood)"):
        seed.add_column(col)
    for label, stage, protocol in SEED_ROWS:
        if protocol in protocols.get(stage, {}):
            got = protocols[stage][protocol]
            seed.add_row(label, cell(got.get("test")), cell(got.get("ood")))
    if "grpo_no_think" in results or "grpo_no_think" in results.get("ood", {}):
        seed.add_row("grpo_no_think (ours, answer)", cell(results.get("grpo_no_think")),
                     cell(results.get("ood", {}).get("grpo_no_think")))
    Console().print(seed)
    print_videoqa(results.get("videoqa") or {})


def print_videoqa(videoqa: dict) -> None:
    """The VideoQA accuracy of each stage (``eval.videoqa``), next to the grounding tables."""
    from rich.console import Console
    from rich.table import Table

    if not videoqa:
        return
    table = Table(title="VideoQA accuracy (%), multiple choice, custom inference (the seed's MVBench reading)")
    for col in ("model", "in domain (mc_test)", "out of domain (mc_ood)"):
        table.add_column(col)
    for stage, splits in videoqa.items():
        table.add_row(stage, *(f"{splits[s]['accuracy']:.1f} (n={splits[s]['n']})" if s in splits else "-"
                               for s in ("mc_test", "mc_ood")))
    Console().print(table)


def finish_run(cfg: TrainConfig, run_dir: Path) -> dict:
    """``results.json``, the comparison table, plots of every GRPO stage together, ``DONE``."""
    from megatron_tr1.rl.logger import read_metrics
    from megatron_tr1.rl.plots import plot_training

    results = collect_results(run_dir)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_results(results)
    if cfg.logging.plots:
        runs = {s: read_metrics(run_dir / "stages" / s / "metrics.jsonl") for s in STAGES if s.startswith("grpo")}
        plot_training({s: r for s, r in runs.items() if r}, run_dir / "plots")
    (run_dir / "DONE").write_text("done\n")
    return results


def train(cfg: TrainConfig, resume: str | None = None, callbacks=()) -> str:
    """Run ``cfg``'s stages (``"done"`` or ``"interrupted"``); ``callbacks(stage, step, metrics)`` run after each
    step. Initialises the process groups (a single process when no launcher set ``RANK``)."""
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rl.trainer import Trainer

    from megatron_tr1.backend import resolve

    backend = resolve(cfg.model.layer_spec, cfg.model.dtype)  # the one CPU/GPU decision of this run
    single_process_env()
    init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, seed=cfg.seed, backend=backend)
    check_layout(cfg, dist.get_world_size())
    if _rank0():
        log.info("backend: %s", backend.describe())
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hf_dir, weights = prepare_model(cfg, run_dir)  # first: a wrong model.hf_dir fails before any data work
    samples = prepare_data(cfg, run_dir)
    status = Trainer(cfg, run_dir, hf_dir, samples, resume=resume or cfg.checkpoint.resume, callbacks=callbacks,
                     backend=backend, init_weights=weights).run()
    if status == "done" and _rank0():
        finish_run(cfg, run_dir)
    _barrier()
    return status


def main(args) -> int:
    cfg = build_config(args)
    if not log.isEnabledFor(logging.DEBUG):  # megatron-core logs every parameter of every DDP bucket at INFO
        logging.getLogger("megatron").setLevel(logging.WARNING)
    status = train(cfg, args.resume)
    if _rank0():
        if status == "interrupted":
            print(f"interrupted: checkpoint saved; continue with `tr1 train ... --run-dir {cfg.run_dir} "
                  f"--resume auto`")
        else:
            print(f"results: {Path(cfg.run_dir) / 'results.json'}")
    return 0
