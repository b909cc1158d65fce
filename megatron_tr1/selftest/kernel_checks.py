"""The Triton kernels (``kernels``) against their plain-PyTorch twins (``kernels.reference``).

``kernels_vs_reference``: values and gradients of ``fused_logprobs`` (fp32 and bf16 logits), ``fused_linear_logprobs``
(fp32 and bf16, chunked) and ``grpo_loss`` (dual clip, low_var_kl, entropy; GSPO + seq-MIS, CISPO + TIS and
GRPO + MIS over ragged masks) against the float64 reference, on
the shapes and tolerances of tests/kernels: a result is within a few ulps of its dtype times the largest |expected|
(64 fp32 eps, 4 bf16 eps), the GRPO loss within rtol 1e-5. Triton runs through its interpreter on CPU
(``TRITON_INTERPRET=1``, set here for this check only) and compiled on a GPU; the check fails if the dispatcher
would not take the Triton path. The value is the worst error as a fraction of its tolerance.

``kernel_at_3b`` (GPU): one kernel at Qwen2.5-VL-3B shapes (H=2048, V=151936, N=8192 tokens, bf16) against eager
PyTorch (``kernels.reference``), as ``tools/bench_kernels.py`` measures: median fwd+bwd time and the CUDA
allocator's peak above the inputs. The kernels exist to cut memory at no cost in time: the log-prob kernels must
stay under half of eager's peak, the GRPO loss under eager's; each no slower than 1.25x eager, except
``fused_linear_logprobs``, which recomputes the logits GEMM in backward by design (2x).
"""
from __future__ import annotations

import contextlib
import os

import torch

from megatron_tr1.selftest import common
from megatron_tr1.selftest.registry import Measured

IGNORE = -100


@contextlib.contextmanager
def _triton_interpreter(on: bool):
    """``TRITON_INTERPRET=1`` while active (CPU), restored after; nothing on a GPU."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def _ulps_error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """max |actual - expected| / (k eps(dtype) x max(1, max |expected|)): <= 1 passes (tests/kernels)."""
    eps = torch.finfo(dtype).eps * (4 if dtype in (torch.bfloat16, torch.float16) else 64)
    atol = eps * max(1.0, expected.abs().max().item())
    return common.max_abs(actual.cpu(), expected.cpu()) / atol


def _rel_error(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max |a - e| / (atol + rtol |e|): <= 1 passes (torch.testing.assert_close's rule)."""
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).abs() / (atol + rtol * e.abs())).max().item()


def _labels(n: int, v: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0], labels[1], labels[2], labels[-1] = 0, v - 1, IGNORE, IGNORE
    return labels.to(device)


def _weighted_backward(outputs, n: int) -> None:
    """Backward of sum(lp * g1 + entropy * g2) with fixed random float64 upstream grads."""
    g = torch.Generator().manual_seed(2)
    g1, g2 = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    lp, ent = outputs
    ((lp.double().cpu() * g1).sum() + (ent.double().cpu() * g2).sum()).backward()


def _logprobs_case(dtype, device) -> dict[str, float]:
    import kernels
    from kernels import reference

    n, v, temperature = 37, 5003, 0.7  # v prime and > the 4096 vocab block
    base = 3.0 * torch.randn(n, v, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = _labels(n, v, device)
    x = base.to(dtype).to(device).requires_grad_()
    _require_triton("fused_logprobs", x)
    out = kernels.fused_logprobs(x, labels, temperature, return_entropy=True)
    _weighted_backward(out, n)
    r = base.to(dtype).double().requires_grad_()
    ref = reference.fused_logprobs(r, labels.cpu(), temperature, return_entropy=True)
    _weighted_backward(ref, n)
    return {"logprobs": _ulps_error(out[0].detach(), ref[0].detach(), torch.float32),
            "entropy": _ulps_error(out[1].detach(), ref[1].detach(), torch.float32),
            "grad": _ulps_error(x.grad, r.grad, dtype)}


def _linear_case(dtype, device) -> dict[str, float]:
    import kernels
    from kernels import reference

    n, h, v = 37, 16, 2503
    g = torch.Generator().manual_seed(0)
    hidden64 = torch.randn(n, h, dtype=torch.float64, generator=g)
    weight64 = torch.randn(v, h, dtype=torch.float64, generator=g) / h ** 0.5 * 3
    labels = _labels(n, v, device)
    hid, w = (t.to(dtype).to(device).requires_grad_() for t in (hidden64, weight64))
    _require_triton("fused_linear_logprobs", hid, w)
    out = kernels.fused_linear_logprobs(hid, w, labels, 0.8, return_entropy=True, chunk_size=1000)
    _weighted_backward(out, n)
    rh, rw = (t.to(dtype).double().requires_grad_() for t in (hidden64, weight64))
    ref = reference.fused_linear_logprobs(rh, rw, labels.cpu(), 0.8, return_entropy=True)
    _weighted_backward(ref, n)
    tol = dtype if dtype != torch.float32 else torch.float32
    return {"logprobs": _ulps_error(out[0].detach(), ref[0].detach(), tol),
            "entropy": _ulps_error(out[1].detach(), ref[1].detach(), tol),
            "grad_hidden": _ulps_error(hid.grad, rh.grad, dtype), "grad_weight": _ulps_error(w.grad, rw.grad, dtype)}


def _grpo_case(device, loss_type: str = "grpo", correction: str = "none") -> dict[str, float]:
    import kernels
    from kernels import reference

    b, t = 5, 13
    g = torch.Generator().manual_seed(0)
    lp = 0.5 * torch.randn(b, t, dtype=torch.float64, generator=g) - 1.0
    old = lp + 0.4 * torch.randn(b, t, dtype=torch.float64, generator=g)
    ref_lp = lp + 0.6 * torch.randn(b, t, dtype=torch.float64, generator=g)
    ent = 2 * torch.randn(b, t, dtype=torch.float64, generator=g).abs()
    adv = torch.randn(b, dtype=torch.float64, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[2] = False
    rollout = old + 0.5 * torch.randn(b, t, dtype=torch.float64, generator=g)
    kw = dict(clip_low=0.2, clip_high=0.28, clip_dual=3.0 if loss_type == "grpo" else None, kl_coef=0.1,
              kl_type="low_var_kl", entropy_coef=0.01, loss_type=loss_type, rollout_correction=correction)

    def run(fn, cast):
        x, e = cast(lp).requires_grad_(), cast(ent).requires_grad_()
        loss, stats = fn(x, cast(old), cast(adv), mask.to(x.device), ref_logprobs=cast(ref_lp), entropy=e,
                         rollout_logprobs=cast(rollout), **kw)
        loss.backward()
        return loss.detach(), x.grad, e.grad, stats

    _require_triton("grpo_loss", lp.float().to(device))
    loss, g_lp, g_ent, stats = run(kernels.grpo_loss, lambda x: x.float().to(device))
    r_loss, r_g_lp, r_g_ent, r_stats = run(reference.grpo_loss, lambda x: x.clone())
    out = {"loss": _rel_error(loss, r_loss, 1e-5, 1e-6), "grad_logprobs": _rel_error(g_lp, r_g_lp, 1e-5, 1e-7),
           "grad_entropy": _rel_error(g_ent, r_g_ent, 1e-5, 1e-7)}
    out["stats"] = max(_rel_error(stats[k], r_stats[k], 1e-5, 1e-6) for k in r_stats)
    return out


def _require_triton(name: str, *tensors: torch.Tensor) -> None:
    from kernels._dispatch import use_triton

    if not use_triton(name, *tensors):
        raise RuntimeError(f"kernels.{name} would run the PyTorch reference here, not Triton: nothing to compare")


def kernels_vs_reference() -> Measured:
    backend = common.check_backend("fp32")
    device = backend.device
    with _triton_interpreter(not backend.cuda):
        cases = {"fused_logprobs.fp32": _logprobs_case(torch.float32, device),
                 "fused_logprobs.bf16": _logprobs_case(torch.bfloat16, device),
                 "fused_linear_logprobs.fp32": _linear_case(torch.float32, device),
                 "fused_linear_logprobs.bf16": _linear_case(torch.bfloat16, device),
                 "grpo_loss.fp32": _grpo_case(device),
                 "grpo_loss.gspo_seq_mis.fp32": _grpo_case(device, "gspo", "seq-mis"),
                 "grpo_loss.cispo_tis.fp32": _grpo_case(device, "cispo", "tis"),
                 "grpo_loss.grpo_mis.fp32": _grpo_case(device, "grpo", "mis")}
    numbers = {f"{case}.{k}": v for case, parts in cases.items() for k, v in parts.items()}
    worst = max(numbers, key=numbers.get)
    mode = "compiled, " + str(device) if backend.cuda else "interpreter, cpu"
    numbers["triton"] = mode
    return Measured(f"{numbers[worst]:.2f} ({worst})", f"<= 1: error / tests/kernels tol. ({mode})",
                    numbers[worst] <= 1.0, numbers)


# --- Qwen2.5-VL-3B shapes on the GPU ---
HIDDEN, VOCAB, TOKENS = 2048, 151936, 8192
LIMITS = {"fused_logprobs": (1.25, 0.5), "fused_linear_logprobs": (2.0, 0.5), "grpo_loss": (1.25, 1.0)}  # time, mem


def _step_3b(kernel: str, device):
    """(make_step(fn), reference fn, triton fn) for one kernel at 3B shapes (as tools/bench_kernels.py)."""
    import kernels
    from kernels import reference

    g = torch.Generator(device).manual_seed(0)
    n = TOKENS
    labels = torch.randint(0, VOCAB, (n,), device=device, generator=g)
    if kernel == "fused_logprobs":
        leaves = [torch.randn(n, VOCAB, device=device, generator=g).to(torch.bfloat16).requires_grad_()]

        def call(fn):
            return fn(leaves[0], labels, 1.0, return_entropy=True)
    elif kernel == "fused_linear_logprobs":
        leaves = [torch.randn(n, HIDDEN, device=device, generator=g).to(torch.bfloat16).requires_grad_(),
                  (torch.randn(VOCAB, HIDDEN, device=device, generator=g) / HIDDEN ** 0.5).to(torch.bfloat16)
                  .requires_grad_()]

        def call(fn):
            return fn(leaves[0], leaves[1], labels, 1.0, return_entropy=True)
    else:
        b, t = 16, n // 16
        leaves = [(torch.randn(b, t, device=device, generator=g) * 0.3 - 1).requires_grad_(),
                  torch.rand(b, t, device=device, generator=g).requires_grad_()]
        old = leaves[0].detach() + 0.1 * torch.randn(b, t, device=device, generator=g)
        ref = leaves[0].detach() + 0.1 * torch.randn(b, t, device=device, generator=g)
        adv, mask = torch.randn(b, device=device, generator=g), torch.ones(b, t, device=device)

        def call(fn):
            loss, _ = fn(leaves[0], old, adv, mask, ref_logprobs=ref, clip_dual=3.0, kl_coef=1e-2, entropy=leaves[1],
                         entropy_coef=1e-3)
            return loss, None

    def make_step(fn):
        def step():
            for leaf in leaves:
                leaf.grad = None
            out, entropy = call(fn)
            (out.float().sum() + (0 if entropy is None else 1e-3 * entropy.sum())).backward()
        return step
    return make_step, getattr(reference, kernel), getattr(kernels, kernel)


def _measure(step, backend, repeats: int = 5) -> tuple[float, float]:
    """(median ms, peak MiB above the memory in use before) of ``step`` after one warm-up."""
    step()
    ms = common.Timer(backend).median_ms(step, repeats)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    backend.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def kernel_at_3b(kernel: str) -> Measured:
    backend = common.check_backend("bf16")
    make_step, eager_fn, triton_fn = _step_3b(kernel, backend.device)
    numbers = {"tokens": TOKENS, "hidden": HIDDEN, "vocab": VOCAB}
    try:
        numbers["triton_ms"], numbers["triton_mib"] = _measure(make_step(triton_fn), backend)
        torch.cuda.empty_cache()
        numbers["eager_ms"], numbers["eager_mib"] = _measure(make_step(eager_fn), backend)
    finally:
        torch.cuda.empty_cache()
    time_ratio = numbers["triton_ms"] / numbers["eager_ms"]
    mem_ratio = numbers["triton_mib"] / max(numbers["eager_mib"], 1e-9)
    numbers.update(time_ratio=time_ratio, mem_ratio=mem_ratio)
    max_time, max_mem = LIMITS[kernel]
    return Measured(f"time {time_ratio:.2f}x, mem {mem_ratio:.2f}x eager ({numbers['triton_ms']:.1f} ms, "
                    f"{numbers['triton_mib']:.0f} MiB)", f"time <= {max_time:g}x, mem <= {max_mem:g}x eager",
                    time_ratio <= max_time and mem_ratio <= max_mem, numbers)
