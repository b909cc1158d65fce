"""kernels._dispatch: Triton where it can run, the reference elsewhere, logged once; import order irrelevant."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

import kernels
from kernels import reference
from kernels._dispatch import use_triton

ROOT = Path(__file__).resolve().parents[2]


def test_backend_choice(monkeypatch):
    x = torch.zeros(2, 3)
    assert use_triton("probe", x)  # CPU + TRITON_INTERPRET=1 (conftest)
    assert not use_triton("probe", x.double())  # float64 always takes the reference
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_triton("probe", x)


def test_choice_is_logged_once(caplog):
    with caplog.at_level(logging.DEBUG, logger="kernels._dispatch"):
        for _ in range(3):
            use_triton("probe_logging", torch.zeros(1))
    assert [r.getMessage() for r in caplog.records] == [
        "kernels.probe_logging: triton (CPU tensors, TRITON_INTERPRET=1)"]


def test_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    logits, labels = torch.randn(4, 9), torch.tensor([1, 2, -100, 8])
    assert torch.equal(kernels.fused_logprobs(logits, labels), reference.fused_logprobs(logits, labels))


PROBE = """
import os, torch, triton            # triton imported in compiled mode, as megatron-core does
import kernels
from kernels import _dispatch, reference
os.environ["TRITON_INTERPRET"] = "1"
assert not _dispatch._library_interpreted()
logits, labels = torch.randn(5, 300), torch.tensor([0, 299, 7, -100, 42])
assert _dispatch.use_triton("fused_logprobs", logits)
torch.testing.assert_close(kernels.fused_logprobs(logits, labels), reference.fused_logprobs(logits, labels))
print("ok")
"""


def test_interpreter_works_when_triton_was_imported_first():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
