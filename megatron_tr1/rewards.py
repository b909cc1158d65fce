"""Rewards for temporal grounding: plain functions of ``(response_text, gt_seconds, duration)``.

``tvg`` is the Temporal-R1 reward: accuracy = temporal IoU of the answered span with the ground truth, format =
1.0 iff the whole response is ``<think>...</think>`` then ``<answer>{"start_time": "s", "end_time": "e"}</answer>``
(the seed's regex, ``re.fullmatch`` with DOTALL), overall = (1 - w) * accuracy + w * format. The seed compares
fractions of ``video_length``; IoU is scale-invariant, so computing it in seconds gives the same number.
Differences from the seed's code: the seed reads the *first* ``<answer>`` and only JSON; ``parse_answer`` reads the
*last* one and also ``"s to e"`` / ``"s - e"``. The seed's released reward (``verl/utils/reward_score/tvg.py`` at
its released commit) weighs accuracy and format 0.5 / 0.5, our default ``format_weight=0.5``; the 0.9 / 0.1 split
exists only in a pre-release commit (``format_weight=0.1``).
"""
from __future__ import annotations

import json
import math
import re
from typing import Callable

Span = tuple[float, float]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"{_NUM}\s*(?:-|to)\s*{_NUM}")
_JSON_BODY = r'<answer>\s*{\s*"start_time"\s*:\s*"([\d.]+)"\s*,\s*"end_time"\s*:\s*"([\d.]+)"\s*}\s*</answer>'
THINK_FORMAT = re.compile(r"<think>.*?</think>\s*" + _JSON_BODY, re.DOTALL)  # the seed's tvg_format_reward
NO_THINK_FORMAT = re.compile(_JSON_BODY, re.DOTALL)  # "RL without think": the answer alone


def temporal_iou(pred: Span, gt: Span) -> float:
    """IoU of two ``(start, end)`` intervals in seconds; 0 when disjoint, degenerate, non-finite or start > end."""
    (ps, pe), (gs, ge) = pred, gt
    if not all(math.isfinite(v) for v in (ps, pe, gs, ge)) or ps > pe or gs > ge:
        return 0.0
    union = max(pe, ge) - min(ps, gs)
    inter = min(pe, ge) - max(ps, gs)
    return inter / union if inter > 0 and union > 0 else 0.0


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_answer(text: str) -> Span | None:
    """The ``(start, end)`` in the last ``<answer>...</answer>`` of ``text``, or None.

    The body is either JSON ``{"start_time": s, "end_time": e}`` (numbers quoted or not) or ``"s to e"`` /
    ``"s - e"``. The span is returned as written (not reordered); anything else gives None.
    """
    answers = _ANSWER.findall(text or "")
    if not answers:
        return None
    body = answers[-1].strip()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        start, end = _number(data.get("start_time")), _number(data.get("end_time"))
        return (start, end) if start is not None and end is not None else None
    match = _RANGE.fullmatch(body)
    return (float(match.group(1)), float(match.group(2))) if match else None


def _reward(response: str, gt: Span, format_re: re.Pattern, format_weight: float) -> dict[str, float]:
    span = parse_answer(response)
    accuracy = temporal_iou(span, gt) if span is not None else 0.0
    fmt = 1.0 if format_re.fullmatch(response or "") else 0.0
    return {"overall": (1.0 - format_weight) * accuracy + format_weight * fmt, "format": fmt, "accuracy": accuracy}


def tvg_reward(response: str, gt: Span, duration: float | None, format_weight: float = 0.5) -> dict[str, float]:
    """Temporal-R1 reward (with think). ``duration`` is unused: IoU does not depend on the time scale."""
    return _reward(response, gt, THINK_FORMAT, format_weight)


def tvg_reward_no_think(response: str, gt: Span, duration: float | None, format_weight: float = 0.5) -> dict[str, float]:
    """Like ``tvg_reward`` but the format is the ``<answer>`` JSON alone, without a think block."""
    return _reward(response, gt, NO_THINK_FORMAT, format_weight)


def tvg_reward_distance(response: str, gt: Span, duration: float, format_weight: float = 0.5) -> dict[str, float]:
    """Time-R1's accuracy, IoU * (1 - |ds| / T) * (1 - |de| / T), with the think format of ``tvg_reward``."""
    out = tvg_reward(response, gt, duration, format_weight)
    span = parse_answer(response)
    if span is not None and duration and duration > 0:
        penalty = (1 - abs(span[0] - gt[0]) / duration) * (1 - abs(span[1] - gt[1]) / duration)
        out["accuracy"] *= max(penalty, 0.0)
        out["overall"] = (1.0 - format_weight) * out["accuracy"] + format_weight * out["format"]
    return out


RewardFn = Callable[..., dict[str, float]]
REWARDS: dict[str, RewardFn] = {"tvg": tvg_reward, "tvg_no_think": tvg_reward_no_think, "tvg_distance": tvg_reward_distance}


# videoqa_mc (tasks/videoqa_mc.py): multiple-choice answers, the answer one option letter. Format: the grounding
# format's shape (think block, then <answer>...</answer>, whole response) with the body a single capital letter,
# optionally in parentheses ("B" or "(B)"); accuracy: 1 when the letter in the last <answer> equals the key.
_MC_BODY = r"<answer>\s*\(?[A-Z]\)?\s*</answer>"
MC_THINK_FORMAT = re.compile(r"<think>.*?</think>\s*" + _MC_BODY, re.DOTALL)
MC_NO_THINK_FORMAT = re.compile(_MC_BODY, re.DOTALL)
_MC_LETTER = re.compile(r"\(?([A-Z])\)?")


def parse_option(text: str) -> str | None:
    """The option letter in the last ``<answer>...</answer>`` of ``text`` (``"B"`` or ``"(B)"``), or None."""
    answers = _ANSWER.findall(text or "")
    match = _MC_LETTER.fullmatch(answers[-1].strip()) if answers else None
    return match.group(1) if match else None


def _mc_reward(response: str, gt: str, format_re: re.Pattern, format_weight: float) -> dict[str, float]:
    if not (isinstance(gt, str) and len(gt) == 1 and gt.isupper()):
        raise ValueError(f"videoqa_mc ground truth must be one option letter A-Z, got {gt!r}")
    accuracy = 1.0 if parse_option(response) == gt else 0.0
    fmt = 1.0 if format_re.fullmatch(response or "") else 0.0
    return {"overall": (1.0 - format_weight) * accuracy + format_weight * fmt, "format": fmt, "accuracy": accuracy}


def videoqa_mc_reward(response: str, gt: str, duration: float | None = None,
                      format_weight: float = 0.5) -> dict[str, float]:
    """Multiple-choice reward (with think): ``gt`` is the correct option's letter; ``duration`` is unused."""
    return _mc_reward(response, gt, MC_THINK_FORMAT, format_weight)


def videoqa_mc_reward_no_think(response: str, gt: str, duration: float | None = None,
                               format_weight: float = 0.5) -> dict[str, float]:
    """Like ``videoqa_mc_reward`` but the format is the ``<answer>`` alone, without a think block."""
    return _mc_reward(response, gt, MC_NO_THINK_FORMAT, format_weight)


REWARDS.update({"videoqa_mc": videoqa_mc_reward, "videoqa_mc_no_think": videoqa_mc_reward_no_think})


def tvg_reward_timer1(response: str, gt: Span, duration: float, format_weight: float = 0.5) -> dict[str, float]:
    """Time-R1's reward (its ``iou_timestamp_reward_v2``): accuracy ``IoU * (1 - |s - s*| / T) * (1 - |e - e*| / T)``
    with ``T`` the video's duration in seconds (floored at 0: an answer reaching outside the video can make one factor
    negative), plus the usual format term (``tvg_reward``'s think format): overall ``(1 - w) * accuracy + w * format``.
    Time-R1 adds its two terms; at ``w = 0.5`` that is twice ours, so GRPO's std-normalised advantages are the same.
    Same numbers as ``tvg_distance`` when a duration is given; this one raises without one (``safe_reward`` then
    scores 0 and counts it) instead of falling back to plain IoU."""
    if duration is None or not duration > 0:
        raise ValueError(f"tvg_timer1 needs the video's duration in seconds (> 0), got {duration!r}")
    out = tvg_reward(response, gt, duration, format_weight)
    span = parse_answer(response)
    if span is not None and out["accuracy"] > 0:
        factors = (1 - abs(span[0] - gt[0]) / duration) * (1 - abs(span[1] - gt[1]) / duration)
        out["accuracy"] *= max(factors, 0.0)
        out["overall"] = (1.0 - format_weight) * out["accuracy"] + format_weight * out["format"]
    return out


REWARDS["tvg_timer1"] = tvg_reward_timer1
