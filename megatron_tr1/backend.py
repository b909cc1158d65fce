"""THE one CPU/GPU decision: device, dtype, layer spec, distributed backend and synchronisation.

``resolve(layer_spec, dtype)`` looks at the machine once and returns a :class:`Backend`; everything that differs
between CPU and GPU (the policy's layers and dtype, the rollout engines' device and dtype, the process-group
backend, step timers, ``tr1 verify``, ``tr1 selftest``, the benchmarks) takes it from there instead of asking
``torch.cuda`` itself. On a machine without CUDA it also switches megatron-core to the CPU stand-in
(``megatron_tr1.cpu``, never imported on a GPU).

==========  ==============================  ===================================================
choice      GPU (CUDA)                      CPU
==========  ==============================  ===================================================
device      ``cuda:LOCAL_RANK``             ``cpu``
dtype       ``auto`` = bf16 (fp32 allowed)  ``auto`` = fp32 (bf16 refused: ``model.dtype``)
layer spec  ``auto`` = ``te`` when          ``auto`` = ``local`` (``te`` refused:
            transformer-engine imports,     ``model.layer_spec``)
            else ``local``
processes   NCCL                            gloo
sync        ``torch.cuda.synchronize``      nothing to wait for
==========  ==============================  ===================================================

Two other choices stay with the code that owns them: the video decoder (``data.video``: DALI on a GPU, PyAV
otherwise) and Triton vs PyTorch per call (``kernels._dispatch``: by the tensors' device).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os

import torch

from megatron_tr1.errors import ConfigError

log = logging.getLogger(__name__)
LAYER_SPECS = ("auto", "local", "te")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where and how this process computes (see the module docstring); build it with :func:`resolve`."""

    device: torch.device
    dtype: torch.dtype
    layer_spec: str  # "local" | "te"
    dist_backend: str  # "nccl" | "gloo"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (so host timers measure it); nothing on CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def sync(self):
        """``synchronize`` where there is something to wait for, else None (for ``rl.stats.StepTimer``)."""
        return self.synchronize if self.cuda else None

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.cuda else "CPU"
        return f"{self.device} ({where}), {self.dtype_name}, layer spec {self.layer_spec}, {self.dist_backend}"


def cuda_available() -> bool:
    """Whether this process can use a CUDA GPU (the one question asked of ``torch.cuda``)."""
    return torch.cuda.is_available()


def te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve(layer_spec: str = "auto", dtype: str = "auto") -> Backend:
    """The backend for this process: ``layer_spec`` (``model.layer_spec``: auto | local | te) and ``dtype``
    (``model.dtype``: auto | fp32 | bf16) checked against the machine, ConfigError naming the key where they
    cannot run. Without CUDA it enables the megatron-core CPU stand-in (idempotent)."""
    if layer_spec not in LAYER_SPECS:
        raise ConfigError(f"model.layer_spec={layer_spec!r} is not one of {', '.join(LAYER_SPECS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if not cuda_available():
        if layer_spec == "te":
            raise ConfigError("model.layer_spec='te' needs a CUDA GPU and transformer-engine; this machine has no "
                              "CUDA GPU: set model.layer_spec=local (or auto)")
        if dtype == "bf16":
            raise ConfigError("model.dtype=bf16 needs a CUDA GPU; the CPU path is fp32: set model.dtype=fp32 "
                              "(or auto)")
        from megatron_tr1.cpu import enable_cpu_megatron  # the CPU backend's megatron-core stand-in
        enable_cpu_megatron()
        return Backend(torch.device("cpu"), DTYPES.get(dtype, torch.float32), "local", "gloo")
    if layer_spec == "te" and not te_importable():
        raise ConfigError("model.layer_spec='te' needs transformer-engine, which is not installed: "
                          "pip install -e \".[gpu]\" (or transformer-engine[pytorch]), or set model.layer_spec=local")
    spec = layer_spec if layer_spec != "auto" else ("te" if te_importable() else "local")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Backend(torch.device("cuda", local_rank), DTYPES.get(dtype, torch.bfloat16), spec, "nccl")
