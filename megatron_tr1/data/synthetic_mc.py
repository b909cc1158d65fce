"""Multiple-choice questions on the synthetic grounding videos, in MVBench's layout (``data.videoqa``).

Two sub-tasks, one question each per video, from the record's event kind and span (``data.synthetic``):
- ``which_event``: "Which happens in this video?", options: the event's phrase and three other kinds' of the same
  split family (in-domain kinds for train/test, the out-of-domain kinds plus in-domain ones for ood);
- ``when_event``: "When does <event> happen?", options "at the beginning" / "in the middle" / "at the end" of the
  video (the third its span's centre falls in).
``which_event``'s wrong options are drawn with a generator seeded by ``(seed, split, index)`` and its right one
goes to position ``index % 4`` (A, B, C, D in turn: the first-option baseline scores exactly the chance floor on a
multiple of 4); ``when_event``'s options keep their natural order. A seed gives the same files.
``write_mc_split`` writes ``mc_<split>/{which_event,when_event}.json`` and ``mc_<split>.yaml`` (``task:
videoqa_mc``), the data config ``tr1 eval --task mvbench`` and training read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

WHICH = "Which happens in this video?"
WHEN = "When does this happen in the video: {event}?"
THIRDS = ("at the beginning", "in the middle", "at the end")
SUB_TASKS = ("which_event", "when_event")
_SPLIT_IDS = {"train": 0, "test": 1, "ood": 2, "pretrain": 3}


def _phrase(kind: str) -> str:
    from megatron_tr1.data.synthetic import EVENTS

    return EVENTS[kind][0]


def which_event(record: dict, kinds: list[str], rng: np.random.Generator, position: int) -> dict:
    """The ``which_event`` question on one synthetic record (its ``event`` among ``kinds``), the right option at
    ``position`` (0-3)."""
    others = [k for k in kinds if k != record["event"]]
    options = [_phrase(others[i]) for i in rng.permutation(len(others))[:3]]
    options.insert(position, _phrase(record["event"]))
    return {"video": record["video"], "question": WHICH, "candidates": options, "answer": _phrase(record["event"])}


def when_event(record: dict, rng: np.random.Generator) -> dict:
    """The ``when_event`` question: which third of the video the event's span centre falls in."""
    centre = (record["solution"][0] + record["solution"][1]) / 2  # fractions of the video length
    answer = THIRDS[min(int(centre * 3), 2)]
    return {"video": record["video"], "question": WHEN.format(event=_phrase(record["event"])),
            "candidates": list(THIRDS), "answer": answer}


def mc_records(records: list[dict], split: str, seed: int) -> dict[str, list[dict]]:
    """Both sub-tasks' records for the synthetic ``records`` of ``split``."""
    from megatron_tr1.data.synthetic import SPLITS

    kinds = list(dict.fromkeys(SPLITS[split][1] + SPLITS["train"][1]))
    out: dict[str, list[dict]] = {name: [] for name in SUB_TASKS}
    for i, record in enumerate(records):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i, 0])
        out["which_event"].append(which_event(record, kinds, rng, i % 4))
        out["when_event"].append(when_event(record, np.random.default_rng([seed, _SPLIT_IDS[split], i, 1])))
    return out


def write_mc_split(out: str | Path, records: list[dict], split: str, seed: int) -> Path:
    """``out/mc_<split>/<sub-task>.json`` (videos in ``out/videos``) and the data config ``out/mc_<split>.yaml``."""
    out = Path(out)
    folder = out / f"mc_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    datasets = []
    for name, recs in mc_records(records, split, seed).items():
        (folder / f"{name}.json").write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")
        datasets.append({"json_path": f"mc_{split}/{name}.json", "data_folder": "videos", "format": "mvbench",
                         "task": "videoqa_mc"})
    config = out / f"mc_{split}.yaml"
    config.write_text(yaml.safe_dump({"datasets": datasets}, sort_keys=False), encoding="utf-8")
    return config
