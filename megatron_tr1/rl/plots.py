"""PNG curves of training metrics over steps (reward mean, response length), like the Temporal-R1 figures.

Each figure draws one line per run (e.g. GRPO with and without think): the raw values faint, an exponential
moving average on top. Records are ``metrics.jsonl`` rows; missing or null values are skipped.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_CURVES = {"reward/mean": ("reward.png", "reward (mean)"),
                  "response_length/mean": ("response_length.png", "response length (tokens)")}


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, seeded with the first value (``alpha`` = weight of the newest value)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in ``records`` where it is a finite number."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [s for s, _ in points], [v for _, v in points]


def plot_curve(runs: Mapping[str, Sequence[Mapping]], key: str, path: str | Path, ylabel: str,
               alpha: float = 0.1) -> Path | None:
    """One PNG of ``key`` over steps for each run (label -> records); None when no run has the key."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    drawn = False
    for i, (label, records) in enumerate(runs.items()):
        steps, values = series(records, key)
        if not steps:
            continue
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, ema(values, alpha), color=color, linewidth=2, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training(runs: Mapping[str, Sequence[Mapping]], out_dir: str | Path,
                  curves: Mapping[str, tuple[str, str]] = DEFAULT_CURVES) -> list[Path]:
    """The default curves (``key -> (file name, y label)``) under ``out_dir``; returns the files written."""
    written = [plot_curve(runs, key, Path(out_dir) / name, ylabel) for key, (name, ylabel) in curves.items()]
    return [p for p in written if p is not None]
