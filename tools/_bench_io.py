"""What the benchmark scripts share: the ``--device`` choice (checked against ``megatron_tr1.backend``), the machine's
name and publishing tables (printed, JSON and Markdown).

``publish(out, "step", slug, title, notes, [(caption, header, lines)], payload)`` prints each table with rich and
writes ``out/step_<slug>.json`` (``payload``) and ``out/step_<slug>.md`` (title, notes, the tables).
"""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.table import Table

from megatron_tr1.backend import cuda_available

Lines = Sequence[Sequence[str]]


def add_device_argument(parser) -> None:
    """``--device cuda|cpu``, by default what the backend finds (``backend.cuda_available``)."""
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda_available() else "cpu")


def check_device(parser, device: str, cpu_on_gpu: bool = True) -> None:
    """Refuse ``--device cuda`` without a GPU, and (``cpu_on_gpu=False``: megatron-core's CPU backend) ``--device
    cpu`` on a GPU machine, where the backend would pick the GPU (hide it with ``CUDA_VISIBLE_DEVICES=``)."""
    if device == "cuda" and not cuda_available() or device == "cpu" and cuda_available() and not cpu_on_gpu:
        parser.error(f"--device {device}: this machine {'has no' if device == 'cuda' else 'has a'} CUDA GPU"
                     + ("" if device == "cuda" else "; run with CUDA_VISIBLE_DEVICES= for the CPU tables"))


def machine_name(device: str, load: bool = True) -> tuple[str, str]:
    """``(machine description, file slug)``: "toy sizes, CPU (...)" and "cpu", or the GPU's name and its slug."""
    if device == "cpu":
        shared = f", shared: load average {os.getloadavg()[0]:.1f}" if load else ""
        return f"toy sizes, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores{shared})", "cpu"
    machine = torch.cuda.get_device_name()
    return machine, re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")


def publish(out: Path, name: str, slug: str, title: str, notes: str | None,
            tables: Sequence[tuple[str | None, Sequence[str], Lines]], payload: dict, left: Sequence[str] = (),
            md_extra: Sequence[str] = ()) -> None:
    """Print ``tables`` (caption, header, rows of cells; ``left`` columns left-aligned) and write the JSON and
    Markdown files ``out/<name>_<slug>.{json,md}``."""
    console = Console(width=max(Console().width, 160))
    md = [f"# {title}", ""] + ([notes, ""] if notes else [])
    for i, (caption, header, lines) in enumerate(tables):
        table = Table(title=title if caption is None else f"{title}\n{caption}",
                      caption=notes if i == len(tables) - 1 else None)
        for h in header:
            table.add_column(h, justify="left" if h in left else "right")
        for cells in lines:
            table.add_row(*cells)
        console.print(table)
        md += ([f"## {caption}", ""] if caption else []) + ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c) + " |" for c in lines] + [""]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_{slug}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}_{slug}.md").write_text("\n".join(md + list(md_extra)).rstrip("\n") + "\n")
