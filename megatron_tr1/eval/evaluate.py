"""``tr1 eval``: run a predictor over a data config and score it (mIoU, R@0.3/0.5/0.7 per dataset).

A predictor maps samples to raw answer texts (``Predictor.predict``), scored against the ground truth in seconds
under a protocol (``eval.protocols``): ``custom`` and ``r1`` are the seed's two inference protocols (their prompt
for ``--model``, the answer stored and read as its lmms-eval does); ``answer`` (default) is ours: the training
prompt, the answer parsed by ``parse_answer`` (or, ``--parser lmms-eval``, by lmms-eval's reader). Every label of the
evaluated split is kept as written (``labels="verbatim"``; labels a training load would skip are counted and
printed), so ``n`` is the whole test set. A model (``--model DIR``:
``eval.model_predictor``, greedy decoding through the rollout engine, ``--no-think`` for answer-only prompts) or a
trivial baseline answering a fixed fraction of each video: ``full`` (the whole video), ``center`` (the middle
half) and ``best-fixed`` (the span maximising mIoU on ``--fit-data``, found on a grid); or ``frame-oracle``, the
ceiling of the frame budget (``eval.frame_oracle``). ``--out DIR`` writes ``predictions.jsonl`` (one line per
sample), ``submission.json`` (lmms-eval's
``temporal_grounding`` layout: ``"video>>>query>>>[start, end]": stored answer``, what the seed's flow stores for
the protocol: the raw text, or ``"s-e"`` for r1; its ``eval_tvg.py`` reads it to our numbers: the labels are
written exactly, and the metrics of ``custom`` / ``r1`` are over the file's keys, a repeated key kept once, last
answer winning, as its submission dict does) and ``metrics.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.errors import ConfigError, DataError
from megatron_tr1.eval.metrics import THRESHOLDS, parse_lmms_eval
from megatron_tr1.eval.protocols import (PROTOCOLS, ScorerCrash, extract_time, lmms_eval_iou, metrics_from_ious,
                                         stored_answer)
from megatron_tr1.rewards import Span, parse_answer, temporal_iou

PARSERS: dict[str, Callable[[str], Span | None]] = {"answer": parse_answer, "lmms-eval": parse_lmms_eval}
FIXED_SPANS = {"full": (0.0, 1.0), "center": (0.25, 0.75)}
GRID_STEP = 0.02


class Predictor(Protocol):
    """Anything that answers grounding queries: one raw response text per sample."""

    name: str

    def predict(self, samples: Sequence[Sample]) -> list[str]: ...


@dataclasses.dataclass
class FixedSpanPredictor:
    """Answers ``[lo * duration, hi * duration]`` for every sample, as ``<answer>s - e</answer>`` (both parsers
    read it)."""

    name: str
    lo: float
    hi: float

    def predict(self, samples: Sequence[Sample]) -> list[str]:
        unknown = next((s for s in samples if s.duration is None), None)
        if unknown is not None:
            raise DataError(f"sample {unknown.id} ({unknown.video}): duration unknown; load it with check_videos=True")
        return [f"<answer>{self.lo * s.duration:.2f} - {self.hi * s.duration:.2f}</answer>" for s in samples]


def fit_fixed_span(samples: Sequence[Sample], step: float = GRID_STEP) -> tuple[float, float, float]:
    """The ``(lo, hi)`` fractions of the duration, on a ``step`` grid, maximising mIoU over ``samples``; returns
    ``(lo, hi, mIoU in percent)``."""
    if not samples:
        raise ConfigError("cannot fit a fixed span on zero samples; check --fit-data")
    grid = np.linspace(0.0, 1.0, int(round(1 / step)) + 1)
    gs = np.array([s.start / s.duration for s in samples])[None]
    ge = np.array([s.end / s.duration for s in samples])[None]
    best = (0.0, 1.0, -1.0)
    for lo in grid[:-1]:  # one row of the grid at a time: memory stays [grid, samples]
        hi = grid[grid > lo][:, None]
        inter = np.clip(np.minimum(hi, ge) - np.maximum(lo, gs), 0, None)
        miou = (inter / (np.maximum(hi, ge) - np.minimum(lo, gs))).mean(axis=1)
        k = int(np.argmax(miou))
        if miou[k] > best[2]:
            best = (round(float(lo), 6), round(float(hi[k, 0]), 6), float(miou[k]))
    return best[0], best[1], 100.0 * best[2]


def _read(text: str, gt: Span, protocol: str, parser: str) -> tuple[Span | None, float, str, str]:
    """``(span read, IoU, stored answer, status)`` of one response: status ``ok``, ``no span`` or ``crashed``."""
    if protocol == "answer":
        pred = PARSERS[parser](text)
        return pred, (temporal_iou(pred, gt) if pred is not None else 0.0), text, "ok" if pred else "no span"
    stored = stored_answer(text, protocol)
    iou, status = lmms_eval_iou(stored, gt)
    try:
        spans = extract_time(stored)
    except ScorerCrash:
        spans = []
    return (spans[0] if spans else None), iou, stored, status


def score(samples: Sequence[Sample], texts: Sequence[str | None], parser: str = "answer",
          protocol: str = "answer") -> list[dict]:
    """One result row per sample: ids, ground truth, the span read, IoU, the raw text and (``stored``) what the
    protocol's flow stores, ``status`` (``ok`` / ``no span`` / ``crashed``); a sample whose text is None (skipped:
    its video could not be decoded) has no row."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    rows = []
    for sample, text in zip(samples, texts, strict=True):
        if text is None:
            continue
        pred, iou, stored, status = _read(text, sample.gt, protocol, parser)
        rows.append({"id": sample.id, "dataset": sample.dataset, "video": sample.video, "query": sample.query,
                     "gt": [sample.start, sample.end], "duration": sample.duration,
                     "pred": list(pred) if pred is not None else None, "iou": iou, "raw": text,
                     "stored": stored, "status": status})
    return rows


def submission_key(row: dict) -> str:
    """lmms-eval's key ``video>>>caption>>>[start, end]``, the label written exactly (``eval()`` reads it back)."""
    return f"{os.path.basename(row['video'])}>>>{row['query']}>>>{[float(t) for t in row['gt']]}"


def as_submitted(rows: Sequence[dict]) -> list[dict]:
    """The rows ``submission.json`` keeps: one per key, the last answer winning (a dict's update), in order."""
    return list({submission_key(r): r for r in rows}.values())


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """Metrics per dataset name, plus ``"all"``."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["dataset"], []).append(row)
    groups["all"] = list(rows)
    return {name: metrics_from_ious([r["iou"] for r in g]) for name, g in groups.items()}


def write_outputs(out: Path, rows: Sequence[dict], metrics: dict) -> None:
    """``predictions.jsonl``, ``submission.json`` (lmms-eval layout) and ``metrics.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    submission = {submission_key(r): r.get("stored", r["raw"]) for r in rows}
    (out / "submission.json").write_text(json.dumps(submission, indent=1) + "\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")


def print_table(per_dataset: dict[str, dict], title: str, console: Console | None = None) -> None:
    """A rich table: one row per dataset (n, mIoU, R@0.3/0.5/0.7), plus "all" when there are several."""
    table = Table(title=title)
    table.add_column("dataset")
    for col in ("n", "mIoU", *(f"R@{t}" for t in THRESHOLDS)):
        table.add_column(col, justify="right")
    names = [n for n in per_dataset if n != "all"] + (["all"] if len(per_dataset) > 2 else [])
    for name in names:
        m = per_dataset[name]
        table.add_row(name, str(m["n"]), *(f"{m[k]:.2f}" for k in ("mIoU", *(f"R@{t}" for t in THRESHOLDS))))
    (console or Console()).print(table)


def _samples(config: str, seed: int, strict: bool, labels: str = "checked") -> list[Sample]:
    loaded = load_samples(load_data_config(config), seed=seed, strict=strict, labels=labels)
    if not loaded.samples:
        raise ConfigError(f"{config}: no samples to evaluate")
    if loaded.notes:
        print(f"{config}: {loaded.notes_summary()} (evaluated as the seed's scorer reads them)")
    return loaded.samples


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="data config YAML to evaluate on")
    parser.add_argument("--task", choices=["grounding", "mvbench"], default="grounding",
                        help="grounding: mIoU and R@0.3/0.5/0.7 (default); mvbench: multiple-choice accuracy on "
                             "MVBench-layout files (eval/mvbench.py; --baseline first|random)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="an HF Qwen2.5-VL folder, or a tr1 Megatron checkpoint folder (e.g. "
                                      "RUN/stages/grpo/model): greedy decoding through the rollout engine")
    what.add_argument("--baseline", choices=[*FIXED_SPANS, "best-fixed", "frame-oracle", "first", "random"],
                      help="full: whole video; center: middle half; best-fixed: span fitted on --fit-data; "
                           "frame-oracle: told which sampled frames show the event (the frame budget's ceiling); "
                           "with --task mvbench: first: option A; random: a seeded random option (chance)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="answer",
                        help="custom: the seed's custom inference (plain system prompt, lmms-eval text, raw answer "
                             "read by its eval_tvg.py); r1: its R1 inference (think prompt, answer reduced to 's-e' "
                             "first); answer: ours (training prompt, <answer> parsed strictly)")
    parser.add_argument("--no-think", action="store_true", help="with --protocol answer: prompt for the answer "
                                                                "only (no <think>), as grpo_no_think trains")
    parser.add_argument("--whole-video", action="store_true",
                        help="with --task mvbench: sample the whole video file even where a record has start / end "
                             "(the seed's lmms-eval did; default: the record's clip)")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollout engine for --model")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="response budget for --model (default 4096: the seed's lmms-eval model classes "
                             "hard-code it, ignoring the task yaml's 50)")
    parser.add_argument("--train-config", help="train config YAML whose data.video frame budget to use for --model "
                                               "or frame-oracle (default: the run's config.yaml next to a trained "
                                               "model, else Temporal-R1's: 2 fps, up to 2048 visual tokens)")
    parser.add_argument("--fit-data", help="data config YAML the best-fixed span is fitted on (e.g. the train split)")
    parser.add_argument("--parser", choices=list(PARSERS), default="answer",
                        help="with --protocol answer: answer: <answer> JSON or 's - e' (default); lmms-eval: its "
                             "offline free-text parser")
    parser.add_argument("--out", help="folder for predictions.jsonl, submission.json and metrics.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of random:N sampling strategies")
    parser.add_argument("--lenient", action="store_true", help="skip bad samples (with one warning) instead of failing")


def video_budget(args):
    """The frame budget for ``--model`` or ``frame-oracle``: the ``data.video`` section of ``--train-config``, of the
    run's ``config.yaml`` beside the model folder (``RUN/stages/<stage>/config.yaml``), or Temporal-R1's."""
    from megatron_tr1.config import from_dict, load_yaml
    from megatron_tr1.data.video import VideoBudget

    config = args.train_config
    if config is None and args.model and (Path(args.model).parent / "config.yaml").is_file():
        config = Path(args.model).parent / "config.yaml"
    if config is None:
        return VideoBudget.temporal_r1()
    section = ((load_yaml(config) or {}).get("data") or {}).get("video") or {}
    return from_dict(VideoBudget, section, f"{config}: data.video")


def build_predictor(args) -> tuple[Predictor, dict]:
    """The predictor the arguments ask for, and what to record about it in ``metrics.json``."""
    if args.model:
        from megatron_tr1.eval.model_predictor import load_model_predictor

        if args.fit_data:
            raise ConfigError("--fit-data is for --baseline best-fixed, not --model")
        budget = video_budget(args)
        mode = args.protocol if args.protocol != "answer" else not args.no_think
        predictor = load_model_predictor(args.model, args.engine, budget, think=mode,
                                         max_tokens=args.max_tokens, name=Path(args.model).name, key="--model",
                                         lenient=args.lenient)
        return predictor, {"model": args.model, "think": mode != "custom" and bool(mode), "prompt": mode,
                           "engine": args.engine, "max_tokens": args.max_tokens, "video": dataclasses.asdict(budget)}
    if (args.baseline == "best-fixed") != bool(args.fit_data):
        raise ConfigError("--fit-data CONFIG is needed by --baseline best-fixed and only by it "
                          "(e.g. --baseline best-fixed --fit-data runs/synthetic/train.yaml)")
    if args.baseline == "frame-oracle":
        from megatron_tr1.eval.frame_oracle import FrameOraclePredictor

        budget = video_budget(args)
        return FrameOraclePredictor(budget), {"video": dataclasses.asdict(budget)}
    if args.baseline != "best-fixed":
        return FixedSpanPredictor(args.baseline, *FIXED_SPANS[args.baseline]), {}
    lo, hi, fit_miou = fit_fixed_span(_samples(args.fit_data, args.seed, not args.lenient))
    print(f"best fixed span on {args.fit_data}: [{lo:.2f}, {hi:.2f}] x duration (fit mIoU {fit_miou:.2f})")
    return FixedSpanPredictor(args.baseline, lo, hi), {"fit_data": args.fit_data, "fixed_span": [lo, hi],
                                                       "fit_mIoU": fit_miou}


def _check_args(args) -> None:
    if args.protocol != "answer" and (args.no_think or args.parser != "answer"):
        raise ConfigError(f"--no-think and --parser go with --protocol answer, not --protocol {args.protocol} "
                          "(whose prompt and reading are the seed's)")


def main(args) -> int:
    if args.task == "mvbench":
        from megatron_tr1.eval import mvbench

        return mvbench.main(args)
    if args.baseline in ("first", "random"):
        raise ConfigError(f"--baseline {args.baseline} answers multiple-choice questions: use it with --task mvbench")
    if getattr(args, "whole_video", False):
        raise ConfigError("--whole-video is for --task mvbench (records with clip bounds); grounding always samples "
                          "the whole video")
    _check_args(args)
    predictor, extra = build_predictor(args)
    samples = _samples(args.data, args.seed, not args.lenient, labels="verbatim")
    rows = score(samples, predictor.predict(samples), args.parser, args.protocol)
    if len(rows) < len(samples):  # --lenient: samples whose video could not be decoded (warned above)
        print(f"skipped {len(samples) - len(rows)} of {len(samples)} samples: undecodable video")
    if not rows:
        raise DataError(f"{args.data}: no sample left to evaluate ({len(samples)} skipped)")
    scored = rows if args.protocol == "answer" else as_submitted(rows)
    if len(scored) < len(rows):
        print(f"{len(rows) - len(scored)} repeated video>>>query>>>span keys kept once, as the seed's submission "
              "dict keeps them")
    per_dataset = summarize(scored)
    counts = {k: sum(r["status"] == k for r in scored) for k in ("no span", "crashed")}
    if args.protocol != "answer" and any(counts.values()):
        print(f"IoU 0 for {counts['no span']} answers without one span and {counts['crashed']} on which the "
              "seed's eval_tvg.py crashes")
    print_table(per_dataset, f"{predictor.name} on {args.data} ({args.protocol} protocol)")
    if args.out:
        metrics = {"predictor": predictor.name, "data": args.data, "protocol": args.protocol,
                   "parser": args.parser, **extra, "skipped_undecodable": len(samples) - len(rows),
                   "no_span": counts["no span"], "crashed": counts["crashed"], "metrics": per_dataset}
        write_outputs(Path(args.out), rows, metrics)
        print(f"wrote predictions.jsonl, submission.json and metrics.json to {args.out}")
    return 0
