"""Grounding metrics (mIoU, R@0.3/0.5/0.7) and lmms-eval's offline answer parser.

``grounding_metrics`` follows lmms-eval's ``eval_tvg.py``: mIoU = 100 * mean IoU, R@t = 100 * fraction of samples
with IoU >= t; an unparsable prediction (None) counts as IoU 0.

``parse_lmms_eval`` is lmms-eval's ``extract_time`` for the ``temporal_grounding_*`` tasks
(``eval.protocols.extract_time``, where its quirks are listed), None where it reads no span or where the original
crashes. It differs from ``megatron_tr1.rewards.parse_answer`` (the reward's parser): it ignores ``<answer>`` tags
and reads the whole text, turns *every* "to" into "-", takes the *first* "a - b" and reorders it, and falls back
to the first number of keyword sentences. A JSON answer ``{"start_time": "1.2", "end_time": "3.4"}`` on one line
therefore does *not* parse there, which is why the original reduces R1 answers with ``extract_timestamps`` first
(``eval.protocols``, protocol ``r1``). Whole-protocol scoring (prompt, reduction, the original's IoU and crashes):
``eval.protocols.score_responses``.
"""
from __future__ import annotations

from typing import Sequence

from megatron_tr1.eval.protocols import ScorerCrash, extract_time
from megatron_tr1.rewards import Span, temporal_iou

THRESHOLDS = (0.3, 0.5, 0.7)


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


def parse_lmms_eval(text: str) -> Span | None:
    """The span lmms-eval's offline evaluator reads from a free-form answer, or None (it then scores IoU 0)."""
    try:
        spans = extract_time(text or "")
    except ScorerCrash:
        return None
    return spans[0] if spans else None
