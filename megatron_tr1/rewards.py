"""Rewards for temporal grounding: plain functions of ``(response_text, gt_seconds, duration)``.

``tvg`` is the Temporal-R1 reward: accuracy = temporal IoU of the answered span with the ground truth, format =
1.0 iff the whole response is ``<think>...</think>`` then ``<answer>{"start_time": "s", "end_time": "e"}</answer>``
(the seed's regex, ``re.fullmatch`` with DOTALL), overall = (1 - w) * accuracy + w * format. The seed compares
fractions of ``video_length``; IoU is scale-invariant, so computing it in seconds gives the same number.
Differences from the seed's code: the seed reads the *first* ``<answer>`` and only JSON; ``parse_answer`` reads the
*last* one and also ``"s to e"`` / ``"s - e"``. The seed's checked-in weights are 0.9 / 0.1; ``format_weight``
defaults to 0.5 as the Temporal-R1 write-up states.
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
