"""Run the checks: ``local`` ones in this process, ``rank`` ones in ONE spawned rank, each ``own`` one in a rank
of its own, ``rank2`` ones on two.

Process start-up (imports of torch, transformers, megatron-core) dominates a CPU run, so every check that needs
megatron parallel state shares one rank process (``launch.run_ranks``, on the backend's process-group backend),
which runs them in registry order and returns one row each. Every check runs inside ``run_one``: an exception is
a FAIL row (value: the exception's last line; the traceback kept for ``-v``) and the next check runs. The rank
appends each row to a JSON-lines file as it finishes, so a rank that dies (a crash in native code, a timeout)
loses only the check it was running: that one is a FAIL with the worker's error, and a fresh rank takes the
rest. Progress (which check is running, its verdict and seconds) goes to stderr; a check's own stdout and Python
warnings are silenced unless verbose.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from megatron_tr1.selftest import registry
from megatron_tr1.selftest.registry import Check, Measured

MAX_WORKER_STARTS = 3


def progress(message: str) -> None:
    print(f"selftest: {message}", file=sys.stderr, flush=True)


def last_line(exc: BaseException) -> str:
    """The exception's last line (``Type: message``); for a rank failure, the last line of the rank's traceback."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def plain(x):
    """``x`` as JSON-ready Python values (tensors and numpy scalars become numbers)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if hasattr(x, "item") and getattr(x, "numel", lambda: 1)() == 1:
        return plain(x.item())
    return str(x)


def row_of(check: Check, **fields) -> dict:
    row = dict(name=check.name, description=check.description, needs=list(check.needs), where=check.where,
               status=None, reason=None, value=None, tolerance=None, numbers={}, seconds=None, error=None,
               traceback=None)
    row.update(fields)
    return row


@contextlib.contextmanager
def _quiet(verbose: bool):
    """A check's stdout (``tr1 train`` prints its results table) and warnings, silenced unless verbose."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_one(check: Check, verbose: bool = False, show: bool = True) -> dict:
    """Run one check; never raises (but KeyboardInterrupt)."""
    if show:
        progress(f"running {check.name} ...")
    start = time.perf_counter()
    try:
        with _quiet(verbose):
            measured = Measured.of(check.function()(**check.kwargs))
        row = row_of(check, status="pass" if measured.passed else "FAIL", value=plain(measured.value),
                     tolerance=measured.tolerance, numbers=plain(measured.numbers))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 -- one failing check must not stop the others
        row = row_of(check, status="FAIL", value=last_line(e), error=last_line(e), traceback=traceback.format_exc())
    row["seconds"] = time.perf_counter() - start
    if show:
        progress(f"  {check.name}: {row['status']} ({row['seconds']:.1f} s)")
    return row


def _worker_setup(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        warnings.simplefilter("ignore")
        import logging

        for name in ("megatron", "transformers", "vllm", "torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def worker(rank: int, world: int, names: list[str], results_path: str, verbose: bool) -> list[dict]:
    """A spawned rank: run ``names`` in order; rank 0 appends each row to ``results_path`` (JSON lines)."""
    _worker_setup(verbose)
    rows = []
    for name in names:
        row = run_one(registry.BY_NAME[name], verbose=verbose and rank == 0, show=rank == 0)
        rows.append(row)
        if rank == 0:
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def _read_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            rows[row["name"]] = row
    return rows


def _run_watched(run_ranks, world: int, args: tuple, kwargs: dict) -> BaseException | None:
    """``run_ranks(*args, **kwargs)`` in a thread, watching its rank processes: one that exits without reporting
    (a crash in native code) ends the wait at once instead of after ``timeout``. The error, or None."""
    import multiprocessing
    import threading

    outcome: list = []
    before = set(multiprocessing.active_children())

    def target():
        try:
            run_ranks(*args, **kwargs)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 -- a dead or hung worker: the caller keeps what it finished
            outcome.append(e)

    thread = threading.Thread(target=target, name="tr1-selftest-ranks", daemon=True)
    thread.start()
    ranks: list = []
    while thread.is_alive():
        thread.join(1.0)
        if len(ranks) < world:
            ranks = [p for p in multiprocessing.active_children() if p not in before][:world]
        dead = [p for p in ranks if p.exitcode not in (None, 0)]
        if dead and thread.is_alive():
            thread.join(5.0)  # a rank that raised reports its traceback before exiting
            if thread.is_alive():
                for p in ranks:
                    if p.is_alive():
                        p.terminate()
                return RuntimeError(f"a rank process died (exit code {dead[0].exitcode})")
    return outcome[0] if outcome else RuntimeError("the rank launcher stopped without a result")


def run_group(names: list[str], world: int, dist_backend: str, timeout: float, verbose: bool) -> tuple[dict, dict]:
    """Run ``names`` on ``world`` spawned ranks (restarting after a dead worker); (rows by name, timing)."""
    from megatron_tr1.launch import run_ranks

    rows: dict[str, dict] = {}
    pending = list(names)
    start, starts = time.perf_counter(), 0
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="tr1-selftest-") as tmp:
        while pending and starts < MAX_WORKER_STARTS:
            starts += 1
            results = Path(tmp) / f"rows_{starts}.jsonl"
            progress(f"starting {world} rank process{'es' if world > 1 else ''} ({dist_backend}) for "
                     f"{len(pending)} check{'s' if len(pending) > 1 else ''}: {', '.join(pending)}")
            error = _run_watched(run_ranks, world, (worker, world, pending, str(results), verbose),
                                 dict(timeout=timeout, threads=threads, dist_backend=dist_backend))
            rows.update(_read_rows(results))
            pending = [n for n in pending if n not in rows]
            if pending and error is not None:  # the check it was running when it died
                why = last_line(error) if str(error) else f"no result within {timeout:.0f} s"
                culprit = registry.BY_NAME[pending.pop(0)]
                rows[culprit.name] = row_of(culprit, status="FAIL", value=f"worker process failed: {why}",
                                            error=why, traceback=str(error) or repr(error))
                progress(f"  {culprit.name}: FAIL (worker process failed: {why})")
        for name in pending:  # gave up restarting
            rows[name] = row_of(registry.BY_NAME[name], status="FAIL", value="not run: the worker process kept failing",
                                error="not run")
    wall = time.perf_counter() - start
    spent = sum(r["seconds"] or 0.0 for r in rows.values())
    return rows, {"checks": list(names), "world_size": world, "dist_backend": dist_backend, "starts": starts,
                  "seconds": wall, "startup_seconds": max(0.0, wall - spent)}


def _dist_backend(verbose: bool) -> str:
    """The process-group backend of the rank processes (``backend.resolve``'s; on CPU resolving imports
    megatron-core here, whose INFO logs and warnings are not the selftest's output)."""
    import logging

    from megatron_tr1.backend import resolve

    if not verbose:
        logging.getLogger("megatron").setLevel(logging.WARNING)
    with _quiet(verbose):
        return resolve().dist_backend


def plan(quick: bool, only: list[str] | None = None) -> tuple[list[Check], dict[str, str]]:
    """(checks that run here, reason for each check that does not)."""
    capabilities = registry.machine_capabilities()
    run, skipped = [], {}
    for check in registry.CHECKS:
        if only is not None and check.name not in only:
            continue
        reason = registry.skip_reason(check, capabilities, quick)
        if reason is None:
            run.append(check)
        else:
            skipped[check.name] = reason
    return run, skipped


def run_all(quick: bool, only: list[str] | None = None, verbose: bool = False, timeout: float | None = None
            ) -> tuple[list[dict], list[dict]]:
    """Every selected check's row, in registry order, and the worker groups' timing."""
    to_run, skipped = plan(quick, only)
    rows = {name: row_of(registry.BY_NAME[name], status="skipped", reason=reason) for name, reason in skipped.items()}
    for check in (c for c in to_run if c.where == "local"):
        rows[check.name] = run_one(check, verbose)
    groups = []
    group_plan = [("rank", 1, [c.name for c in to_run if c.where == "rank"])]
    group_plan += [("own", 1, [c.name]) for c in to_run if c.where == "own"]
    group_plan += [("rank2", 2, [c.name for c in to_run if c.where == "rank2"])]
    for where, world, names in group_plan:
        if names:
            dist_backend = _dist_backend(verbose)
            limit = timeout or (600.0 if all(registry.BY_NAME[n].cpu for n in names) else 1200.0)
            group_rows, timing = run_group(names, world, dist_backend, limit, verbose)
            rows.update(group_rows)
            groups.append(timing)
    order = [c.name for c in registry.CHECKS if c.name in rows]
    return [rows[name] for name in order], groups
