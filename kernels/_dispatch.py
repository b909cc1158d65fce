"""The one place that decides Triton vs the PyTorch reference, and how Triton kernels are launched.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set (the interpreter, how CI
checks the kernels). Everything else -- CPU without the interpreter, float64 inputs -- goes to
``kernels.reference``. The choice is logged at debug level once per (function, backend).

``triton_kernel`` makes the interpreter independent of import order. Triton reads ``TRITON_INTERPRET`` when a
function is decorated -- ours, and triton's own ``@jit`` library helpers (``tl.max``, ``tl.sum``, ...) decorated
when ``triton`` is first imported (megatron-core imports it). So kernels are jitted at launch, once per setting,
and an interpreted launch in a process that imported triton in compiled mode runs those library helpers through
the interpreter too (``_interpreted_library_calls``).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable

import torch
import triton

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()
_interpreted: dict[int, tuple] = {}  # id(JITFunction) -> (it, its InterpretedFunction)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(name: str, *tensors: torch.Tensor) -> bool:
    """Whether ``name`` should run its Triton kernel on ``tensors`` (``None`` entries are skipped).

    True iff every floating tensor has a dtype in ``TRITON_DTYPES`` and all tensors are on CUDA, or all on CPU
    with the interpreter on.
    """
    present = [t for t in tensors if t is not None]
    if any(t.is_floating_point() and t.dtype not in TRITON_DTYPES for t in present):
        ok, why = False, "dtype outside float32/bfloat16/float16"
    elif all(t.is_cuda for t in present):
        ok, why = True, "CUDA tensors"
    elif all(t.device.type == "cpu" for t in present) and interpreting():
        ok, why = True, "CPU tensors, TRITON_INTERPRET=1"
    else:
        ok, why = False, "no Triton backend for these tensors"
    backend = "triton" if ok else "reference"
    if (name, backend) not in _logged:
        _logged.add((name, backend))
        log.debug("kernels.%s: %s (%s)", name, backend, why)
    return ok


class triton_kernel:
    """Decorator: a Triton kernel jitted lazily, once per interpreter setting; launch as ``k[grid](...)``."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._jitted: dict[bool, object] = {}

    def jitted(self):
        """The ``triton.jit`` object for the current ``TRITON_INTERPRET`` setting."""
        mode = interpreting()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode]

    def __getitem__(self, grid):
        launch = self.jitted()[grid]
        if not interpreting() or _library_interpreted():
            return launch

        def launch_interpreted(*args, **kwargs):
            with _interpreted_library_calls():
                return launch(*args, **kwargs)
        return launch_interpreted


def _library_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton.language.standard.sum, InterpretedFunction)


@contextmanager
def _interpreted_library_calls():
    """While active, calling a compiled-mode ``JITFunction`` (only legal inside a kernel, so only reached from an
    interpreted kernel) runs it as an ``InterpretedFunction`` instead of raising."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call(jit_fn, *args, **kwargs):
        key = id(jit_fn)
        if key not in _interpreted:
            _interpreted[key] = (jit_fn, InterpretedFunction(jit_fn.fn))  # keep jit_fn alive: ids stay unique
        return _interpreted[key][1](*args, **kwargs)

    original = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original
