"""Benchmark the kernels against eager PyTorch (``kernels.reference``) and ``torch.compile`` of the reference.

Each case times forward + backward (median of ``--repeats`` after one warm-up, which includes compilation) and
measures the peak memory it adds above its inputs:

- ``fused_logprobs``: bf16 logits ``[N, V]`` -> log-probs + entropy (both in the loss).
- ``fused_linear_logprobs``: hidden ``[N, H]`` and LM-head weight ``[V, H]`` (bf16) -> log-probs + entropy.
- ``grpo_loss``: ``[16, N / 16]`` float32 log-probs, per-sequence advantages, dual clip, low_var_kl, entropy.

GPU: Qwen2.5-VL-3B shapes (H=2048, V=151936, bf16) at N = 4k..32k tokens; peak memory from the CUDA allocator;
``fused_logprobs`` also reports bytes moved (read logits twice, write the gradient) per second. CPU: toy sizes,
Triton through its interpreter (``TRITON_INTERPRET=1``), so CPU timings only show the path runs; CPU peak memory
counts the bytes of live tensors that aten ops allocate (the interpreter's copies of kernel arguments included;
compiled code is opaque to it, hence no CPU figure for ``compile``). Out-of-memory is recorded as such.

    python tools/bench_kernels.py                      # GPU if there is one, else CPU toy sizes
    python tools/bench_kernels.py --device cpu --tokens 512 1024

Writes ``benchmarks/kernels_<device>.json`` and ``.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _bench_io import add_device_argument, check_device, machine_name, publish  # noqa: E402  (tools/ is on sys.path when run as a script)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

SHAPES = {"cuda": dict(hidden=2048, vocab=151936, tokens=[4096, 8192, 16384, 32768], chunk=None, repeats=10),
          "cpu": dict(hidden=64, vocab=4099, tokens=[256], chunk=1024, repeats=2)}
VARIANTS = ("triton", "eager", "compile")
NOTES = {
    "cuda": "Peak MiB: CUDA allocator peak above the inputs during one fwd+bwd (fresh grads included). "
            "GB/s: 3 x logits bytes (read twice, gradient written once) per fwd+bwd.",
    "cpu": "Toy sizes, CPU: the triton columns run in the Triton interpreter, so their times show the path works, "
           "not its speed. Peak MiB: live tensor bytes that aten ops allocate during one fwd+bwd (fresh grads "
           "included); code compiled by torch.compile is opaque to that count, hence no compile figure.",
}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by aten ops while active (CPU stand-in for allocator stats)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key not in self.live and key not in inputs:  # views and in-place results allocate nothing
                    self.live[key] = t.untyped_storage().nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._release, key)
        return out


def _leaves(*tensors):
    """``tensors`` as autograd leaves, plus a reset that drops their grads (as ``zero_grad(set_to_none=True)``:
    each step then allocates its gradients, and that counts in its peak)."""
    leaves = [t.requires_grad_() for t in tensors]

    def fresh_grads():
        for leaf in leaves:
            leaf.grad = None
    return leaves, fresh_grads


def logprobs_case(n, hidden, vocab, chunk, device):
    """bf16 logits [N, V] -> log-probs + entropy; also the bytes a fwd+bwd must move (read twice, write once)."""
    g = torch.Generator(device).manual_seed(0)
    (logits,), fresh_grads = _leaves(torch.randn(n, vocab, device=device, generator=g).to(torch.bfloat16))
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)

    def make_step(fn):
        def step():
            fresh_grads()
            out, entropy = fn(logits, labels, 1.0, return_entropy=True)
            (out.sum() + 1e-3 * entropy.sum()).backward()
        return step
    return make_step, 3 * logits.numel() * logits.element_size()


def linear_logprobs_case(n, hidden, vocab, chunk, device):
    """bf16 hidden [N, H] and LM-head weight [V, H] -> log-probs + entropy."""
    g = torch.Generator(device).manual_seed(0)
    (hid, weight), fresh_grads = _leaves(
        torch.randn(n, hidden, device=device, generator=g).to(torch.bfloat16),
        (torch.randn(vocab, hidden, device=device, generator=g) / hidden ** 0.5).to(torch.bfloat16))
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)

    def make_step(fn):
        def step():
            fresh_grads()
            out, entropy = fn(hid, weight, labels, 1.0, return_entropy=True, chunk_size=chunk)
            (out.sum() + 1e-3 * entropy.sum()).backward()
        return step
    return make_step, None


def grpo_case(n, hidden, vocab, chunk, device):
    """[16, N / 16] float32 log-probs, per-sequence advantages, dual clip, low_var_kl and entropy terms."""
    g = torch.Generator(device).manual_seed(0)
    b, t = 16, n // 16
    (lp, ent), fresh_grads = _leaves(torch.randn(b, t, device=device, generator=g) * 0.3 - 1,
                                     torch.rand(b, t, device=device, generator=g))
    old = lp.detach() + 0.1 * torch.randn(b, t, device=device, generator=g)
    ref = lp.detach() + 0.1 * torch.randn(b, t, device=device, generator=g)
    adv, mask = torch.randn(b, device=device, generator=g), torch.ones(b, t, device=device)

    def make_step(fn):
        def step():
            fresh_grads()
            loss, _ = fn(lp, old, adv, mask, ref_logprobs=ref, clip_dual=3.0, kl_coef=1e-2, entropy=ent,
                         entropy_coef=1e-3)
            loss.backward()
        return step
    return make_step, None


CASES = {"fused_logprobs": logprobs_case, "fused_linear_logprobs": linear_logprobs_case, "grpo_loss": grpo_case}


def implementation(kernel: str, variant: str):
    import kernels
    from kernels import reference
    if variant == "triton":
        return getattr(kernels, kernel)
    fn = getattr(reference, kernel)
    return torch.compile(fn) if variant == "compile" else fn


def measure(step, device: str, repeats: int, track_cpu_memory: bool) -> tuple[float, float | None]:
    """(median ms, peak MiB above the memory in use before the call) of ``step``."""
    step()  # warm-up: compilation, autotuning, allocator caches
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    elif track_cpu_memory:
        with LiveTensorBytes() as mode:
            step()
        peak = mode.peak / 2 ** 20
    else:
        peak = None
    return statistics.median(times), peak


def run(device: str, tokens: list[int], hidden: int, vocab: int, chunk: int | None, repeats: int) -> list[dict]:
    rows = []
    for n in tokens:
        for kernel, case in CASES.items():
            make_step, moved = case(n, hidden, vocab, chunk, device)  # inputs live for this kernel only
            for variant in VARIANTS:
                row = dict(kernel=kernel, tokens=n, variant=variant, ms=None, peak_mib=None, gbps=None,
                           status="ok")
                try:
                    step = make_step(implementation(kernel, variant))
                    row["ms"], row["peak_mib"] = measure(step, device, repeats, variant != "compile")
                    if moved and variant == "triton" and device == "cuda":
                        row["gbps"] = moved / row["ms"] / 1e6
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                if device == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(f"{kernel} N={n} {variant}: {row['status']} {row['ms']} ms {row['peak_mib']} MiB",
                      file=sys.stderr)
    return rows


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table_rows(rows: list[dict]) -> list[list[str]]:
    """One line per (kernel, N): time and peak of each variant, Triton's speed-up and memory share vs eager."""
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["tokens"]), {})[r["variant"]] = r
    out = []
    for (kernel, n), v in by_key.items():
        ms = {k: v[k]["ms"] if v[k]["status"] == "ok" else None for k in VARIANTS}
        mib = {k: v[k]["peak_mib"] if v[k]["status"] == "ok" else None for k in VARIANTS}
        speedup = ms["eager"] / ms["triton"] if ms["eager"] and ms["triton"] else None
        mem = mib["triton"] / mib["eager"] if mib["eager"] and mib["triton"] is not None else None
        cells = [kernel, str(n)]
        cells += [_fmt(ms[k], ".2f") if v[k]["status"] == "ok" else v[k]["status"] for k in VARIANTS]
        cells += [_fmt(mib[k], ".3g") if v[k]["status"] == "ok" else v[k]["status"] for k in VARIANTS]
        cells += [_fmt(speedup, ".2f"), _fmt(mem, ".3f"), _fmt(v["triton"]["gbps"], ".0f")]
        out.append(cells)
    return out


HEADER = ["kernel", "N", "triton ms", "eager ms", "compile ms", "triton MiB", "eager MiB", "compile MiB",
          "eager/triton time", "triton/eager mem", "triton GB/s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--tokens", type=int, nargs="+", help="N values (default: per device)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    cfg = dict(SHAPES[args.device])
    cfg["tokens"] = args.tokens or cfg["tokens"]
    cfg["repeats"] = args.repeats or cfg["repeats"]
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    machine, slug = machine_name(args.device, load=False)
    rows = run(args.device, cfg["tokens"], cfg["hidden"], cfg["vocab"], cfg["chunk"], cfg["repeats"])
    title = (f"kernels fwd+bwd: {machine}; H={cfg['hidden']} V={cfg['vocab']} bf16, "
             f"torch {torch.__version__}, chunk_size={cfg['chunk'] or 'default'}")
    publish(args.out, "kernels", slug, title, NOTES[args.device], [(None, HEADER, table_rows(rows))],
            dict(machine=machine, torch=torch.__version__, config=cfg, results=rows), left=("kernel",))

if __name__ == "__main__":
    main()
