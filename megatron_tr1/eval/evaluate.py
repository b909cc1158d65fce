"""``tr1 eval``: run a predictor over a data config and score it (mIoU, R@0.3/0.5/0.7 per dataset).

A predictor maps samples to raw answer texts (``Predictor.predict``); the texts are parsed (``parse_answer`` by
default, or lmms-eval's offline parser) and scored against the ground truth in seconds. A model (``--model DIR``:
``eval.model_predictor``, greedy decoding through the rollout engine, ``--no-think`` for answer-only prompts) or a
trivial baseline answering a fixed fraction of each video: ``full`` (the whole video), ``center`` (the middle
half) and ``best-fixed`` (the span maximising mIoU on ``--fit-data``, found on a grid); or ``frame-oracle``, the
ceiling of the frame budget (``eval.frame_oracle``). ``--out DIR`` writes ``predictions.jsonl`` (one line per
sample), ``submission.json`` (lmms-eval's
``temporal_grounding`` layout: ``"video>>>query>>>[start, end]": raw answer``, readable by its ``eval_tvg.py``)
and ``metrics.json``.
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
from megatron_tr1.eval.metrics import THRESHOLDS, grounding_metrics, parse_lmms_eval
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


def score(samples: Sequence[Sample], texts: Sequence[str | None], parser: str = "answer") -> list[dict]:
    """One result row per sample: ids, ground truth, parsed prediction, IoU and the raw text; a sample whose text
    is None (skipped: its video could not be decoded) has no row."""
    parse = PARSERS[parser]
    rows = []
    for sample, text in zip(samples, texts, strict=True):
        if text is None:
            continue
        pred = parse(text)
        rows.append({"id": sample.id, "dataset": sample.dataset, "video": sample.video, "query": sample.query,
                     "gt": [sample.start, sample.end], "duration": sample.duration,
                     "pred": list(pred) if pred is not None else None,
                     "iou": temporal_iou(pred, sample.gt) if pred is not None else 0.0, "raw": text})
    return rows


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """Metrics per dataset name, plus ``"all"``."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["dataset"], []).append(row)
    groups["all"] = list(rows)
    return {name: grounding_metrics([tuple(r["pred"]) if r["pred"] else None for r in g], [tuple(r["gt"]) for r in g])
            for name, g in groups.items()}


def write_outputs(out: Path, rows: Sequence[dict], metrics: dict) -> None:
    """``predictions.jsonl``, ``submission.json`` (lmms-eval layout) and ``metrics.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    submission = {f"{os.path.basename(r['video'])}>>>{r['query']}>>>{[round(t, 2) for t in r['gt']]}": r["raw"]
                  for r in rows}
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


def _samples(config: str, seed: int, strict: bool) -> list[Sample]:
    samples = load_samples(load_data_config(config), seed=seed, strict=strict).samples
    if not samples:
        raise ConfigError(f"{config}: no samples to evaluate")
    return samples


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="data config YAML to evaluate on")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="an HF Qwen2.5-VL folder, or a tr1 Megatron checkpoint folder (e.g. "
                                      "RUN/stages/grpo/model): greedy decoding through the rollout engine")
    what.add_argument("--baseline", choices=[*FIXED_SPANS, "best-fixed", "frame-oracle"],
                      help="full: whole video; center: middle half; best-fixed: span fitted on --fit-data; "
                           "frame-oracle: told which sampled frames show the event (the frame budget's ceiling)")
    parser.add_argument("--no-think", action="store_true", help="prompt for the answer only (no <think>)")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollout engine for --model")
    parser.add_argument("--max-tokens", type=int, default=1024, help="response budget for --model")
    parser.add_argument("--train-config", help="train config YAML whose data.video frame budget to use for --model "
                                               "or frame-oracle (default: the run's config.yaml next to a trained "
                                               "model, else Temporal-R1's: 2 fps, up to 2048 visual tokens)")
    parser.add_argument("--fit-data", help="data config YAML the best-fixed span is fitted on (e.g. the train split)")
    parser.add_argument("--parser", choices=list(PARSERS), default="answer",
                        help="answer: <answer> JSON or 's - e' (default); lmms-eval: its offline free-text parser")
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
        predictor = load_model_predictor(args.model, args.engine, budget, think=not args.no_think,
                                         max_tokens=args.max_tokens, name=Path(args.model).name, key="--model",
                                         lenient=args.lenient)
        return predictor, {"model": args.model, "think": not args.no_think, "engine": args.engine,
                           "video": dataclasses.asdict(budget)}
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


def main(args) -> int:
    predictor, extra = build_predictor(args)
    samples = _samples(args.data, args.seed, not args.lenient)
    rows = score(samples, predictor.predict(samples), args.parser)
    if len(rows) < len(samples):  # --lenient: samples whose video could not be decoded (warned above)
        print(f"skipped {len(samples) - len(rows)} of {len(samples)} samples: undecodable video")
    if not rows:
        raise DataError(f"{args.data}: no sample left to evaluate ({len(samples)} skipped)")
    per_dataset = summarize(rows)
    print_table(per_dataset, f"{predictor.name} on {args.data}")
    if args.out:
        metrics = {"predictor": predictor.name, "data": args.data, "parser": args.parser, **extra,
                   "skipped_undecodable": len(samples) - len(rows), "metrics": per_dataset}
        write_outputs(Path(args.out), rows, metrics)
        print(f"wrote predictions.jsonl, submission.json and metrics.json to {args.out}")
    return 0
