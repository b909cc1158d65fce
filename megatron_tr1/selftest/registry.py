"""The checks of ``tr1 selftest``: name, what each needs, where it runs, and the function that measures it.

A check function takes keyword arguments (``Check.kwargs``) and returns a :class:`Measured` (or a
``(value, tolerance, passed)`` tuple): the headline value, the tolerance it was judged against (as text, with
the reason for it), whether it passed, and any further numbers for ``selftest.json``. An exception is a FAIL
whose value is the exception's last line.

``needs`` names what the machine must have: ``cuda`` (a CUDA GPU), ``te`` (transformer-engine), ``dali``
(NVIDIA DALI), ``vllm`` and ``2gpus``; a check that lacks one is skipped with the reason. Checks without
``cuda`` are the CPU checks (``--quick``); on a GPU node they run on the GPU, in fp32. ``where`` says which
process runs it: ``local`` (the selftest process itself: no megatron parallel state, no CUDA), ``rank`` (one
spawned rank, shared by all ``rank`` checks in registry order), ``own`` (a spawned rank of its own: vLLM, whose
engine keeps its memory and process group until the process ends) or ``rank2`` (two spawned ranks, one per GPU).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Callable

from megatron_tr1 import backend as _backend

NEEDS = ("cuda", "te", "dali", "vllm", "2gpus")
WHERE = ("local", "rank", "own", "rank2")


@dataclasses.dataclass
class Measured:
    """What a check measured: ``value`` (a number, or short text), ``tolerance`` (text), ``passed``, and
    ``numbers`` (every other figure, for ``selftest.json``)."""

    value: Any
    tolerance: str
    passed: bool
    numbers: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, out) -> "Measured":
        if isinstance(out, Measured):
            return out
        value, tolerance, passed = out
        return cls(value, tolerance, bool(passed))


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    target: str  # "module:function", importable in a spawned rank
    description: str
    needs: tuple[str, ...] = ()
    where: str = "rank"
    kwargs: dict = dataclasses.field(default_factory=dict)

    def function(self) -> Callable[..., Any]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def cpu(self) -> bool:
        """A CPU check (runs with ``--quick``)."""
        return "cuda" not in self.needs


_M, _K, _V = "megatron_tr1.selftest.model_checks", "megatron_tr1.selftest.kernel_checks", \
    "megatron_tr1.selftest.video_checks"
_R, _G = "megatron_tr1.selftest.rollout_checks", "megatron_tr1.selftest.grpo_checks"

CHECKS: list[Check] = [
    # --- always (CPU is enough; fp32, on the GPU where there is one) ---
    Check("video.pyav", f"{_V}:pyav_decode", "PyAV decode + sampling of a generated H.264 clip vs its source frames",
          where="local"),
    Check("model_vs_hf.fp32", f"{_M}:model_vs_hf", "megatron-core `local` Qwen2.5-VL vs HF logits and RL log-probs, "
          "fp32", kwargs=dict(dtype="fp32")),
    Check("packing.fp32", f"{_M}:packed_vs_padded", "one micro-batch packed into a row (thd) vs padded: RL "
          "log-probs and entropies, fp32", kwargs=dict(dtype="fp32")),
    Check("kernels.vs_reference", f"{_K}:kernels_vs_reference", "Triton kernels vs float64 PyTorch twins: values "
          "and gradients (interpreter on CPU, compiled on GPU)"),
    Check("rollout.hf_sync.fp32", f"{_R}:hf_engine_after_sync", "HF engine after a weight sync vs the trainer's "
          "log-probs, fp32", kwargs=dict(dtype="fp32")),
    Check("grpo.tp1.fp32", f"{_G}:grpo_three_steps", "3 GRPO steps (tr1 train) on the tiny model, TP=1, fp32",
          kwargs=dict(dtype="fp32")),
    # --- with CUDA ---
    Check("model_vs_hf.bf16", f"{_M}:model_vs_hf", "megatron-core `local` bf16 vs HF fp32 logits, judged by HF "
          "bf16's own error", needs=("cuda",), kwargs=dict(dtype="bf16")),
    Check("model_vs_hf.te.bf16", f"{_M}:te_vs_local_vs_hf", "megatron-core `te` vs `local` vs HF logits, bf16",
          needs=("cuda", "te")),
    Check("packing.bf16", f"{_M}:packed_vs_padded", "packed (thd, the backend's layer spec: te where it imports) "
          "vs padded, bf16", needs=("cuda",), kwargs=dict(dtype="bf16")),
    Check("kernels.3b.fused_logprobs", f"{_K}:kernel_at_3b", "Triton vs eager at Qwen2.5-VL-3B shapes (N=8192, "
          "V=151936, bf16): fwd+bwd time and peak memory", needs=("cuda",), kwargs=dict(kernel="fused_logprobs")),
    Check("kernels.3b.fused_linear_logprobs", f"{_K}:kernel_at_3b", "the same for hidden [N, 2048] x LM head "
          "[151936, 2048]", needs=("cuda",), kwargs=dict(kernel="fused_linear_logprobs")),
    Check("kernels.3b.grpo_loss", f"{_K}:kernel_at_3b", "the same for the GRPO loss on [16, 512] log-probs",
          needs=("cuda",), kwargs=dict(kernel="grpo_loss")),
    Check("video.dali_mixed", f"{_V}:dali_mixed_decode", "DALI `mixed` (NVDEC) decode of an H.264 clip vs PyAV",
          needs=("cuda", "dali")),
    Check("rollout.hf_sync.bf16", f"{_R}:hf_engine_after_sync", "HF engine after a weight sync vs the trainer's "
          "log-probs, bf16 on the GPU", needs=("cuda",), kwargs=dict(dtype="bf16")),
    Check("grpo.tp1.bf16", f"{_G}:grpo_three_steps", "3 GRPO steps on the tiny model, TP=1, bf16 (layer spec "
          "auto)", needs=("cuda",), kwargs=dict(dtype="bf16")),
    Check("rollout.vllm.bf16", f"{_R}:vllm_engine", "vLLM on the GPU: generate, sleep / wake_up, weight sync, "
          "engine vs trainer log-probs", needs=("cuda", "vllm"), where="own"),
    Check("grpo.tp2.bf16", f"{_G}:grpo_three_steps", "3 GRPO steps on the tiny model, TP=2 over 2 GPUs, bf16",
          needs=("cuda", "2gpus"), where="rank2", kwargs=dict(dtype="bf16", tp=2)),
]
BY_NAME = {c.name: c for c in CHECKS}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def machine_capabilities() -> dict[str, str | None]:
    """need -> None when this machine has it, else why not (the text after "skipped: ")."""
    cuda = _backend.cuda_available()
    gpus = 0
    if cuda:
        import torch
        gpus = torch.cuda.device_count()
    return {
        "cuda": None if cuda else "no CUDA GPU",
        "te": None if _backend.te_importable() else "transformer-engine not installed",
        "dali": None if _importable("nvidia.dali") else "NVIDIA DALI not installed",
        "vllm": None if _importable("vllm") else "vLLM not installed",
        "2gpus": None if gpus >= 2 else f"needs 2 GPUs, {gpus} visible",
    }


def skip_reason(check: Check, capabilities: dict[str, str | None], quick: bool) -> str | None:
    """Why ``check`` does not run here (None: it runs). Missing hardware or packages come first, so a CPU
    machine says "no CUDA GPU" with or without ``--quick``."""
    for need in check.needs:
        if capabilities.get(need):
            return capabilities[need]
    if quick and not check.cpu:
        return "--quick runs the CPU checks only"
    return None
