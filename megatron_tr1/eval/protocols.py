"""Temporal-R1's evaluation protocols, scored exactly as its vendored lmms-eval scores them.

Three protocols (``PROTOCOLS``), each a prompt (``data.prompt``) plus a reading of the answer:

- ``custom``: the seed's "custom inference" (its base, SFT and "think ✗" rows): system prompt "You are a helpful
  assistant.", the lmms-eval user text; the raw answer is stored and read by ``extract_time``.
- ``r1``: the seed's "R1 inference" (its "think ✓" row): the think system prompt; the answer is first reduced by
  ``extract_timestamps`` (the lmms-eval ``qwen2_5_vl_r1`` model class) to ``"s-e"``, which is stored and read by
  ``extract_time``.
- ``answer``: ours, strict: ``rewards.parse_answer`` (the last ``<answer>``, the seed's JSON or ``s - e``) and
  ``rewards.temporal_iou``.

``extract_time`` is the behaviour of lmms-eval's ``tasks/charades_sta/eval_tvg.py`` (identical in
``activitynet_tvg``), written from it: the text is lower-cased, the prompt's example phrase removed and *every* "to"
replaced by "-" (so "1 to 2" reads, and "into" becomes "in-"); every ``a - b`` match of ``(\\d+\\.*\\d*)\\s*-\\s*
(\\d+\\.*\\d*)`` in the whole text is converted to floats and the *first* is kept; without one, the first number
of each sentence (split at ``!``, ``?`` and newlines, never at ``.``) that contains a keyword (``start``, ``end``,
``happen``, ...) is taken, and those numbers are paired in order; a span is reordered to start <= end. Its third,
``HH:MM:SS`` fallback can never yield a span: it is reached only when fewer than two keyword sentences hold a number,
while each sentence it would read holds one (it then appends a stale number, a tuple-vs-string slip), so a single
``00:00:18`` sentence gives nothing, and ``"starts at 00:00:18\\nends at 00:00:23"`` reads as (0.0, 0.0) through the
number fallback (the hours field). A text that yields no span scores IoU 0 (the original substitutes a span 10-20 s
after the ground truth's end, which never overlaps it).

IoU is the original's ``max(min(e1, e2) - max(s1, s2), 0) / (max(e1, e2) - min(s1, s2))`` with the ground truth
used as stored (a label with start > end scores 0 against any reordered prediction). Where the original *crashes*
we count IoU 0 and report the count (``crashed``): a match such as ``"1..2 - 3"`` anywhere in the text (``float``
fails on ``1..2``), and a zero-length union (a degenerate prediction equal to a ground-truth point, e.g. the r1
fallback ``"0.0-0.0"`` against a ``[0, 0]`` label). mIoU and R@0.3/0.5/0.7 are over all ``n`` responses, in percent.
"""
from __future__ import annotations

import re
from typing import Sequence

from megatron_tr1.rewards import Span, parse_answer, temporal_iou

PROTOCOLS = ("custom", "r1", "answer")
THRESHOLDS = (0.3, 0.5, 0.7)
R1_FALLBACK = "0.0-0.0"

_EXAMPLE = "a specific example is : 20.8 - 30.0 seconds"
_RANGE = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")
_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
_R1_ANSWER = re.compile(
    r'<think>.*?</think>\s*<answer>\s*{\s*"start_time"\s*:\s*"([\d.]+)"\s*,\s*"end_time"\s*:\s*"([\d.]+)"\s*}'
    r"\s*</answer>", re.DOTALL)


class ScorerCrash(ValueError):
    """Where lmms-eval's ``eval_tvg.py`` raises on a response; the protocols count it as IoU 0."""


def extract_timestamps(text: str) -> str:
    """The ``qwen2_5_vl_r1`` model class's reduction of an R1 answer: ``re.search`` of the whole think + answer
    pattern (numbers quoted, digits and dots only) anywhere in ``text``, stored as ``f"{float(s)}-{float(e)}"``
    (``"1.0-2.5"``); no match, or a number ``float`` rejects (``"1..2"``), gives ``"0.0-0.0"``."""
    match = _R1_ANSWER.search(text or "")
    if not match:
        return R1_FALLBACK
    try:
        return f"{float(match.group(1))}-{float(match.group(2))}"
    except ValueError:
        return R1_FALLBACK


def extract_time(text: str) -> list[Span]:
    """The spans ``eval_tvg.py``'s ``extract_time`` reads from ``text``: ``[]`` or one ``(start, end)`` with start
    <= end (see the module docstring). Raises ``ScorerCrash`` where the original raises."""
    paragraph = str(text).lower().replace(_EXAMPLE, "").replace("to", "-")
    candidates = [s for s in re.split(r"[!?\n]", paragraph) if any(k in s for k in _KEYWORDS)]
    try:  # every match is converted, as the original does, so a bad one anywhere raises
        spans = [(float(a), float(b)) for a, b in _RANGE.findall(paragraph)]
    except ValueError as e:
        raise ScorerCrash(f"eval_tvg.py raises on {text!r}: {e}") from None
    if not spans:
        firsts = [float(found[0]) for s in candidates if (found := _NUMBER.findall(s))]
        firsts = firsts[: len(firsts) // 2 * 2]
        spans = [(firsts[i], firsts[i + 1]) for i in range(0, len(firsts), 2)]
    # (the HH:MM:SS fallback would run here; it cannot yield a span: see the module docstring)
    return [(s, e) if e > s else (e, s) for s, e in spans[:1]]


def original_iou(gt: Sequence[float], pred: Sequence[float]) -> float:
    """``eval_tvg.py``'s ``iou(gt, pred)``; ``ScorerCrash`` on a zero-length union (the original divides by 0)."""
    union = max(gt[1], pred[1]) - min(gt[0], pred[0])
    if union == 0:
        raise ScorerCrash(f"eval_tvg.py divides by zero: ground truth {list(gt)}, prediction {list(pred)}")
    return max(min(gt[1], pred[1]) - max(gt[0], pred[0]), 0) / union


def stored_answer(response: str, protocol: str) -> str:
    """What the original's flow stores in ``submission.json`` for ``response``: the raw text (custom; ours for
    answer) or ``extract_timestamps`` (r1)."""
    _check(protocol)
    return extract_timestamps(response) if protocol == "r1" else response


def lmms_eval_iou(stored: str, gt: Span) -> tuple[float, str]:
    """IoU of one stored answer as ``eval_tvg.py`` scores it, and what happened: ``"ok"``, ``"no span"`` or
    ``"crashed"`` (both IoU 0)."""
    try:
        spans = extract_time(stored)
        if len(spans) != 1:
            return 0.0, "no span"
        return original_iou(gt, spans[0]), "ok"
    except ScorerCrash:
        return 0.0, "crashed"


def response_iou(response: str, gt: Span, protocol: str) -> tuple[float, str]:
    """IoU of one model response under ``protocol``, and ``"ok"`` / ``"no span"`` / ``"crashed"``."""
    if _check(protocol) == "answer":
        span = parse_answer(response)
        return (0.0, "no span") if span is None else (temporal_iou(span, gt), "ok")
    return lmms_eval_iou(stored_answer(response, protocol), gt)


def metrics_from_ious(ious: Sequence[float]) -> dict[str, float]:
    """``{"n", "mIoU", "R@0.3", "R@0.5", "R@0.7"}`` in percent over all ``ious``."""
    n = len(ious)
    out: dict[str, float] = {"n": n, "mIoU": 100.0 * sum(ious) / n if n else 0.0}
    for t in THRESHOLDS:
        out[f"R@{t}"] = 100.0 * sum(iou >= t for iou in ious) / n if n else 0.0
    return out


def score_responses(responses: Sequence[str], gts: Sequence[Span], protocol: str) -> dict:
    """mIoU and R@0.3/0.5/0.7 (percent) of model ``responses`` against ``gts`` (seconds) under ``protocol``
    (``custom``, ``r1`` or ``answer``), with ``n`` and the counts of responses without a span (``no_span``) and
    where the original scorer crashes (``crashed``), both IoU 0."""
    _check(protocol)
    if len(responses) != len(gts):
        raise ValueError(f"score_responses: {len(responses)} responses for {len(gts)} ground truths")
    results = [response_iou(r, tuple(g), protocol) for r, g in zip(responses, gts)]
    out = metrics_from_ious([iou for iou, _ in results])
    out["no_span"] = sum(what == "no span" for _, what in results)
    out["crashed"] = sum(what == "crashed" for _, what in results)
    return out


def _check(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return protocol
