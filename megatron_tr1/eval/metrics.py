"""Grounding metrics (mIoU, R@0.3/0.5/0.7) and lmms-eval's offline answer parser.

``grounding_metrics`` follows lmms-eval's ``eval_tvg.py``: mIoU = 100 * mean IoU, R@t = 100 * fraction of samples
with IoU >= t; an unparsable prediction (None) counts as IoU 0.

``parse_lmms_eval`` reproduces lmms-eval's ``extract_time`` for the ``temporal_grounding_*`` tasks. It differs from
``megatron_tr1.rewards.parse_answer`` (the reward's parser) in four ways: it ignores ``<answer>`` tags and reads the
whole text; it lowercases and turns *every* "to" into "-" (so "1.2 to 3.4" parses); it takes the *first* "a - b" in
the text and reorders it to start <= end; and without one it falls back to pairing the first number of each sentence
that mentions start/end/happen (lmms-eval's further HH:MM:SS fallback never yields a value, a tuple-vs-string
slip, so it is left out). A JSON answer ``{"start_time": "1.2", "end_time": "3.4"}`` on one line therefore
does *not* parse there (only one number is taken from the sentence), which is why R1-style outputs need
``parse_answer``.
"""
from __future__ import annotations

import re
from typing import Sequence

from megatron_tr1.rewards import Span, temporal_iou

THRESHOLDS = (0.3, 0.5, 0.7)

_LMMS_PROMPT_EXAMPLE = "a specific example is : 20.8 - 30.0 seconds"
_LMMS_RANGE = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")
_LMMS_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
_LMMS_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")


def grounding_metrics(preds: Sequence[Span | None], gts: Sequence[Span]) -> dict[str, float]:
    """``{"n", "mIoU", "R@0.3", "R@0.5", "R@0.7"}`` in percent over paired predictions and ground truths."""
    if len(preds) != len(gts):
        raise ValueError(f"grounding_metrics: {len(preds)} predictions for {len(gts)} ground truths")
    ious = [temporal_iou(p, g) if p is not None else 0.0 for p, g in zip(preds, gts)]
    n = len(ious)
    out: dict[str, float] = {"n": n, "mIoU": 100.0 * sum(ious) / n if n else 0.0}
    for t in THRESHOLDS:
        out[f"R@{t}"] = 100.0 * sum(iou >= t for iou in ious) / n if n else 0.0
    return out


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1..2" matches the range pattern; lmms-eval crashes on it, here the match is skipped
        return None


def _pairs(times: list[float]) -> list[tuple[float, float]]:
    times = times[: len(times) // 2 * 2]
    return [(times[i], times[i + 1]) for i in range(0, len(times), 2)]


def parse_lmms_eval(text: str) -> Span | None:
    """The span lmms-eval's offline evaluator reads from a free-form answer, or None (it then scores IoU 0)."""
    paragraph = (text or "").lower().replace(_LMMS_PROMPT_EXAMPLE, "").replace("to", "-")
    candidates = [s for s in re.split(r"[!?\n]", paragraph) if any(k in s for k in _LMMS_KEYWORDS)]
    spans = [(_float(a), _float(b)) for a, b in _LMMS_RANGE.findall(paragraph)]
    spans = [s for s in spans if None not in s]
    if not spans:
        firsts = [_LMMS_NUMBER.findall(s) for s in candidates]
        spans = _pairs([float(found[0]) for found in firsts if found])
    if not spans:
        return None
    start, end = spans[0]
    return (start, end) if end > start else (end, start)
