"""Faults a training step survives: a reward function that raises, and a NaN loss.

``safe_reward`` scores a sample 0 when its reward function raises or returns something unusable, and says so,
so the trainer can count failures per step instead of crashing on one odd response. ``NanGuard`` tells the
trainer to skip a step whose loss (or gradient norm) is not finite, with a warning, and raises
``TrainingDiverged`` after ``max_consecutive`` such steps in a row.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

log = logging.getLogger(__name__)

ZERO_REWARD = {"overall": 0.0, "format": 0.0, "accuracy": 0.0}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


def safe_reward(fn: Callable[..., dict], response: str, gt: tuple[float, float], duration: float | None,
                **kwargs) -> tuple[dict[str, float], bool]:
    """``(fn(response, gt, duration, **kwargs), False)``, or ``(ZERO_REWARD copy, True)`` when ``fn`` raises or
    its result has no finite ``"overall"``. Failures are logged at debug level (the trainer logs the count)."""
    try:
        out = fn(response, gt, duration, **kwargs)
        if not isinstance(out, dict) or not math.isfinite(float(out["overall"])):
            raise ValueError(f"reward returned {out!r}, need a dict with a finite 'overall'")
    except Exception as e:  # noqa: BLE001 - any failure of user reward code scores 0
        log.debug("reward %s failed on %r: %s", getattr(fn, "__name__", fn), response[:200], e)
        return dict(ZERO_REWARD), True
    return out, False


class NanGuard:
    """Decides whether to apply a step given its loss; ``max_consecutive`` non-finite losses in a row raise."""

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def check(self, loss: float, step: int) -> bool:
        """True: apply the step. False: skip it (non-finite ``loss``; logged). Raises ``TrainingDiverged`` on the
        ``max_consecutive``-th non-finite loss in a row."""
        if math.isfinite(float(loss)):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"step {step}: loss is {loss} for {self.consecutive} consecutive steps "
                f"(logging.max_nan_steps={self.max_consecutive}); lower optim.lr, raise optim.warmup_steps or "
                f"resume from an earlier checkpoint")
        log.warning("step %d: loss is %s; skipping the update (%d in a row, stop at %d)", step, loss,
                    self.consecutive, self.max_consecutive)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])
