"""Run a function on N local ranks (one process each) and gather what each rank returns.

Used by ``tr1 verify``, ``tr1 selftest`` and the multi-rank tests (TP=2, PP=2, DP=2). Each rank runs
``fn(rank, world_size, *args)`` after ``torch.distributed`` is initialised on a free loopback port with
``dist_backend`` (gloo, the CPU default; NCCL on a GPU node, rank ``r`` on GPU ``r``); the launcher variables
(``RANK``, ``LOCAL_RANK``, ...) are set as torchrun sets them. The return values (picklable) come back in rank
order. An exception on any rank is re-raised here with that rank's traceback, so a failure shows the real error.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, threads: int,
            dist_backend: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if dist_backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(dist_backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # report, never hang the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, threads: int = 1,
              dist_backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the results in rank order.

    ``fn`` must be importable (a module-level function), as ranks are started with ``spawn``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, threads, dist_backend),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks may be blocked in a collective; stop them below
    finally:
        for p in procs:
            p.join(timeout=5 if failures else timeout)
            if p.is_alive():
                p.terminate()
    if failures:
        raise RuntimeError("a rank failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
