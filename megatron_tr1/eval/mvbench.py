"""``tr1 eval --task mvbench``: multiple-choice VideoQA accuracy on MVBench-layout files (``data.videoqa``).

Written from lmms-eval's MVBench task (``lmms_eval/tasks/mvbench/``: ``utils.py``, which the seed's fork carries
unchanged, and the task yamls):
- **prompt** (``mvbench_doc_to_text``): ``"Question:" + question + "\\nOption:\\n" + "(A) text\\n(B) text\\n..." +
  post_prompt``; the post-prompt is ``"Only give the best option.\\n"``, what every sub-task's yaml of the seed's era
  gives (``_default_template_yaml`` versions; later versions moved some sub-tasks to "Answer with the option's
  letter from the given choices directly."). The Qwen2.5-VL model class puts it after the video in one user turn,
  system prompt "You are a helpful assistant." (``--protocol custom``). A record's ``start`` / ``end`` cut the
  clip (qwen-vl-utils' ``video_start`` / ``video_end``, which lmms-eval's MVBench passes for records with bounds
  today); ``--whole-video`` samples the whole file instead, as the seed's lmms-eval of early 2025 did (its
  ``mvbench_doc_to_visual`` returned the path only).
- **answer** (``mcq_acc``'s ``process``, ``lmms_eval_option``): ``"X. text"`` at the start -> X; else newlines and
  tabs to spaces, its punctuation pass, quotes and parentheses stripped, lower-cased, and the first standalone
  letter a-e (any case, so an article "a" counts) -> its capital; no such letter: the processed text itself. A
  response is right when its reading equals the key letter's reading.
- **aggregation** (``mvbench_aggregate_results``): lmms-eval divides by the non-empty responses only; ``accuracy``
  here is over all ``n`` (an empty response is wrong), and its number is kept as ``lmms_eval_accuracy`` beside
  ``answered``.

Protocols: ``custom`` (above); ``r1``: the seed's R1 inference, its think system prompt and the same user text,
the answer read from inside the last ``<answer>...</answer>`` (none: an empty answer); ``answer`` (ours): the
videoqa_mc task's training prompt (``data.videoqa``; ``--no-think``: answer only), read strictly by
``rewards.parse_option``. Baselines: ``first`` (always option A) and ``random`` (a seeded option per record: the
chance floor). Outputs: ``predictions.jsonl``, ``metrics.json`` (``{"overall": {"accuracy", "n", ...},
"<sub-task>": {...}}``, percent), ``run.json`` (what was evaluated, how) and a table.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.dataset import load_data_config
from megatron_tr1.data.prompt import SYSTEM_PROMPT_PLAIN, SYSTEM_PROMPT_THINK, PromptSpec
from megatron_tr1.data.videoqa import (FORMAT, LETTERS, SYSTEM_PROMPT_MC_NO_THINK, SYSTEM_PROMPT_MC_THINK, MCLoad,
                                       MCSample, clip_of, is_mvbench_file, lettered_options, load_mvbench,
                                       mc_user_text)
from megatron_tr1.errors import ConfigError, DataError
from megatron_tr1.rewards import parse_option

POST_PROMPT = "Only give the best option.\n"
PROTOCOLS = ("custom", "r1", "answer")
BASELINES = ("first", "random")
TASK = "videoqa_mc"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in the original
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def mvbench_text(sample: MCSample, post_prompt: str = POST_PROMPT) -> str:
    """lmms-eval's MVBench user text for ``sample``."""
    return "Question:" + sample.question + "\nOption:\n" + lettered_options(sample.candidates) + post_prompt


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # the original passes re.UNICODE (= 32) where sub takes its count


def lmms_eval_option(text: str) -> str:
    """What lmms-eval's MVBench scorer reads from ``text``: a capital option letter A-E, or the processed text."""
    match = _OPTION.match(text.strip())
    if match:
        return match.group(1).upper()
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = _LETTER.search(text)
    return letter.group(1).upper() if letter else text


def stored_answer(response: str, protocol: str) -> str:
    """The text the protocol's scorer reads: the raw response (custom, answer), or the body of its last
    ``<answer>`` (r1; ``""`` without one)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown MVBench protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if protocol != "r1":
        return response
    answers = _ANSWER.findall(response or "")
    return answers[-1].strip() if answers else ""


def is_correct(response: str, letter: str, protocol: str) -> tuple[bool, str]:
    """Whether ``response`` answers ``letter`` under ``protocol``, and what was read from it."""
    if protocol == "answer":
        read = parse_option(response) or ""
        return read == letter, read
    read = lmms_eval_option(stored_answer(response, protocol))
    return read == lmms_eval_option(letter), read


def score(samples: Sequence[MCSample], texts: Sequence[str | None], protocol: str) -> list[dict]:
    """One row per sample (none for a sample whose text is None: skipped, its video undecodable)."""
    rows = []
    for s, text in zip(samples, texts, strict=True):
        if text is None:
            continue
        correct, read = is_correct(text, s.letter, protocol)
        rows.append({"id": s.id, "dataset": s.dataset, "video": s.video, "question": s.question,
                     "candidates": list(s.candidates), "start": s.start, "end": s.end, "gt": s.letter,
                     "raw": text, "stored": stored_answer(text, protocol) if protocol != "answer" else text,
                     "pred": read, "correct": correct})
    return rows


def accuracy(rows: Sequence[dict]) -> dict:
    """``accuracy`` (percent, over all ``n``), ``answered`` (non-empty stored answers) and
    ``lmms_eval_accuracy`` (over those, as lmms-eval aggregates)."""
    n, answered = len(rows), [r for r in rows if r["stored"] != ""]
    right = sum(r["correct"] for r in rows)
    return {"accuracy": 100.0 * right / n if n else 0.0, "n": n, "answered": len(answered),
            "lmms_eval_accuracy": 100.0 * sum(r["correct"] for r in answered) / len(answered) if answered else 0.0}


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """``{"overall": accuracy(rows), "<sub-task>": accuracy(its rows), ...}``."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["dataset"], []).append(r)
    return {"overall": accuracy(rows), **{name: accuracy(g) for name, g in groups.items()}}


class OptionBaseline:
    """``first``: always option A; ``random``: one option per record drawn with ``(seed, id)`` (order-free)."""

    def __init__(self, kind: str, seed: int = 0):
        if kind not in BASELINES:
            raise ConfigError(f"unknown MVBench baseline {kind!r}; choose from {', '.join(BASELINES)}")
        self.name, self.kind, self.seed = kind, kind, seed

    def answer(self, s: MCSample) -> str:
        k = 0 if self.kind == "first" else random.Random(f"{self.seed}:{s.id}").randrange(len(s.candidates))
        return LETTERS[k]

    def predict(self, samples: Sequence[MCSample], protocol: str = "custom") -> list[str]:
        wrap = {"custom": "{}", "r1": "<think></think><answer>{}</answer>", "answer": "<answer>{}</answer>"}
        return [wrap[protocol].format(self.answer(s)) for s in samples]


def prompt_mode(protocol: str, think: bool = True) -> PromptSpec:
    """The prompt mode (``data.prompt.PromptSpec``) of a protocol."""
    if protocol == "answer":
        return PromptSpec(SYSTEM_PROMPT_MC_THINK if think else SYSTEM_PROMPT_MC_NO_THINK)
    return PromptSpec(SYSTEM_PROMPT_PLAIN if protocol == "custom" else SYSTEM_PROMPT_THINK)


def as_prompt_sample(s: MCSample, protocol: str, whole_video: bool = False) -> Sample:
    """``s`` as the ``Sample`` a ``PromptCache`` builds prompts from: the protocol's user text as ``problem``, the
    record's clip (none with ``whole_video``)."""
    text = mc_user_text(s.question, s.candidates) if protocol == "answer" else mvbench_text(s)
    return Sample(video=s.video, query=s.question, start=0.0, end=0.0, duration=None, dataset=s.dataset, id=s.id,
                  problem=text, clip=None if whole_video else clip_of(s))


def load_config(config: str, seed: int = 0, strict: bool = True) -> MCLoad:
    """Every MVBench-layout file a data config lists (``format: auto | mvbench``, ``task: auto | videoqa_mc``),
    each sampled by its ``sampling_strategy``."""
    from megatron_tr1.data.dataset import _sample

    cfg, out = load_data_config(config), MCLoad([])
    for i, entry in enumerate(cfg.datasets):
        at = f"{config}: datasets[{i}]"
        sniffed = entry.format == FORMAT or (entry.format == "auto" and is_mvbench_file(entry.json_path))
        if not sniffed or entry.task not in ("auto", TASK):
            raise ConfigError(f"{at}: --task mvbench reads format: {FORMAT} files (records with question, "
                              f"candidates, answer) of task: {TASK}, got {entry.json_path} with format: "
                              f"{entry.format}, task: {entry.task}")
        loaded = load_mvbench(entry.json_path, entry.data_folder, strict=strict)
        loaded.samples = _sample(loaded.samples, entry.sampling_strategy, random.Random(f"{seed}:{i}"))
        out.extend(loaded)
    if out.skipped:
        print(f"{config}: {out.summary()}")
    if not out.samples:
        raise DataError(f"{config}: no multiple-choice record to evaluate")
    return out


def print_table(metrics: dict[str, dict], title: str, console: Console | None = None) -> None:
    """One row per sub-task (n, accuracy, answered), then the overall row."""
    table = Table(title=title)
    for col, justify in (("sub-task", "left"), ("n", "right"), ("accuracy", "right"), ("answered", "right")):
        table.add_column(col, justify=justify)
    for name in [k for k in metrics if k != "overall"] + ["overall"]:
        m = metrics[name]
        table.add_row(name, str(m["n"]), f"{m['accuracy']:.2f}", str(m["answered"]))
    (console or Console()).print(table)


def _model_texts(args, samples: Sequence[MCSample]) -> tuple[list[str | None], dict]:
    import dataclasses

    from megatron_tr1.eval import model_predictor
    from megatron_tr1.eval.evaluate import video_budget

    budget = video_budget(args)
    mode = prompt_mode(args.protocol, not args.no_think)
    predictor = model_predictor.load_model_predictor(args.model, args.engine, budget, think=mode,
                                                     max_tokens=args.max_tokens, name=Path(args.model).name,
                                                     key="--model", lenient=args.lenient)
    texts = predictor.predict([as_prompt_sample(s, args.protocol, args.whole_video) for s in samples])
    return texts, {"predictor": predictor.name, "model": args.model, "system_prompt": mode.system,
                   "clips": "whole video" if args.whole_video else "start/end",
                   "engine": args.engine, "max_tokens": args.max_tokens, "video": dataclasses.asdict(budget)}


def main(args) -> int:
    """``tr1 eval --task mvbench`` (the arguments of ``eval.evaluate.add_arguments``)."""
    if args.baseline is not None and args.baseline not in BASELINES:
        raise ConfigError(f"--task mvbench takes --baseline {' or '.join(BASELINES)}, not {args.baseline}")
    if args.fit_data or args.parser != "answer":
        raise ConfigError("--fit-data and --parser are for grounding, not --task mvbench")
    if args.no_think and args.protocol != "answer":
        raise ConfigError(f"--no-think goes with --protocol answer, not --protocol {args.protocol}")
    loaded = load_config(args.data, args.seed, strict=not args.lenient)
    samples = loaded.samples
    if args.model:
        texts, extra = _model_texts(args, samples)
    else:
        baseline = OptionBaseline(args.baseline, args.seed)
        texts, extra = baseline.predict(samples, args.protocol), {"predictor": baseline.name}
    rows = score(samples, texts, args.protocol)
    if len(rows) < len(samples):
        print(f"skipped {len(samples) - len(rows)} of {len(samples)} records: undecodable video")
    if not rows:
        raise DataError(f"{args.data}: no record left to evaluate ({len(samples)} skipped)")
    metrics = summarize(rows)
    print_table(metrics, f"{extra['predictor']} on {args.data} (MVBench, {args.protocol} protocol)")
    if args.out:
        run = {"task": "mvbench", "data": args.data, "protocol": args.protocol, **extra,
               "skipped_undecodable": len(samples) - len(rows), "skipped_records": dict(loaded.skipped)}
        write_outputs(Path(args.out), rows, metrics, run)
        print(f"wrote predictions.jsonl, metrics.json and run.json to {args.out}")
    return 0


def write_outputs(out: Path, rows: Sequence[dict], metrics: dict, run: dict | None = None) -> None:
    """``predictions.jsonl`` (one row per record), ``metrics.json`` and, when given, ``run.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    if run is not None:
        (out / "run.json").write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
