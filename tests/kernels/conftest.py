"""Kernel tests run the Triton kernels on CPU through the interpreter (``TRITON_INTERPRET=1``).

The variable is set for each test of this directory (and so for the gloo ranks they spawn) and restored after,
so the rest of a one-process suite keeps its own backend choice. Import order does not matter: triton reads the
variable when a kernel is jitted, and ``kernels._dispatch.triton_kernel`` jits at launch, per setting --
``test_kernel_dispatch.py`` checks this in a fresh interpreter that imports ``kernels`` first.
"""
import pytest


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
