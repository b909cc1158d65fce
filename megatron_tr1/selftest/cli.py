"""``tr1 selftest``: check every path this machine can run; one table, ``selftest.json``, exit 1 on any FAIL.

    tr1 selftest                  # everything this machine can run (GPU checks where there is a GPU)
    tr1 selftest --quick          # the CPU checks only (CI runs this; about a minute on 2 cores)
    tr1 -v selftest               # also the tracebacks of failed checks
    tr1 selftest --only kernels.vs_reference,video.pyav --out /tmp/st.json

Exit status: 0 when no check that ran failed, 1 when one did, 2 on a usage error. Checks this machine cannot run
are listed as ``skipped: <reason>``. The checks and what each compares: ``megatron_tr1/selftest/registry.py``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from megatron_tr1.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    from megatron_tr1.selftest.registry import CHECKS

    parser.epilog = "checks (needs):\n" + "\n".join(f"  {c.name:<34}{', '.join(c.needs) or 'CPU'}" for c in CHECKS)
    parser.add_argument("--quick", action="store_true", help="the CPU checks only (under a minute or two)")
    parser.add_argument("--out", type=Path, default=Path("selftest.json"),
                        help="where to write the JSON report (default: ./selftest.json)")
    parser.add_argument("--only", help="comma-separated check names to run (default: all)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a worker process may take for its checks (default: 600 CPU, 1200 GPU)")


def _names() -> list[str]:
    from megatron_tr1.selftest.registry import CHECKS

    return [c.name for c in CHECKS]


def _only(text: str | None) -> list[str] | None:
    if text is None:
        return None
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in _names()]
    if unknown or not wanted:
        raise ConfigError(f"--only {text!r}: unknown check(s) {unknown}; choose from {', '.join(_names())}")
    return wanted


def main(args: argparse.Namespace) -> int:
    from megatron_tr1.selftest import report, runner

    verbose = getattr(args, "verbose", False) or logging.getLogger().getEffectiveLevel() <= logging.DEBUG  # tr1 -v
    only = _only(args.only)
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout}: must be > 0 seconds")
    start = time.perf_counter()
    rows, groups = runner.run_all(args.quick, only, verbose, args.timeout)
    seconds = time.perf_counter() - start
    machine = report.machine_info()
    exit_code = 1 if any(r["status"] == "FAIL" for r in rows) else 0
    report.write_json(args.out, rows, groups, machine, args.quick, seconds, exit_code)
    report.print_table(rows, machine, args.quick, seconds, args.out)
    if verbose:
        report.print_tracebacks(rows)
    return exit_code
