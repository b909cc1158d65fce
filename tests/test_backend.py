"""One backend decision (``megatron_tr1.backend``): what it resolves to on this CPU machine, the clear errors for
choices this machine cannot run, and that nothing else in the package asks ``torch.cuda`` whether it is there."""
import ast
from pathlib import Path

import pytest
import torch

from megatron_tr1.backend import resolve
from megatron_tr1.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_tr1"
# the backend, the decoder backend (data.video: DALI on a GPU) and the CPU stand-in's own refusal to run on a GPU
ALLOWED = {"backend.py", "data/video.py", "cpu/megatron.py"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU backend")


def test_cpu_resolves_to_local_fp32_gloo():
    for spec, dtype in (("auto", "auto"), ("local", "fp32"), ("auto", "fp32")):
        b = resolve(spec, dtype)
        assert (b.device, b.dtype, b.layer_spec, b.dist_backend) == (torch.device("cpu"), torch.float32, "local",
                                                                    "gloo")
        assert b.sync is None and not b.cuda
    b.synchronize()  # nothing to wait for


@pytest.mark.parametrize("spec, dtype, match", [
    ("te", "auto", r"model.layer_spec='te' needs a CUDA GPU.*set model.layer_spec=local"),
    ("auto", "bf16", r"model.dtype=bf16 needs a CUDA GPU.*set model.dtype=fp32"),
    ("tensorrt", "auto", r"model.layer_spec='tensorrt' is not one of auto, local, te"),
    ("auto", "fp16", r"model.dtype='fp16' is not one of auto, fp32, bf16"),
])
def test_choices_this_machine_cannot_run_name_the_key(spec, dtype, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec, dtype)


def test_train_config_refuses_te_on_cpu_before_anything_is_built(tmp_path):
    from megatron_tr1.cli import main

    assert main(["train", "--run-dir", str(tmp_path / "run"), "model.layer_spec=te"]) == 2
    assert not (tmp_path / "run" / "data").exists()  # refused before data or model work


def _cuda_checks(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "is_available" and \
                ast.unparse(node.value).endswith("cuda"):
            lines.append(node.lineno)
    return lines


def test_no_scattered_cuda_checks():
    """Device, dtype, layer spec, process-group backend and synchronisation are decided in backend.py; only the
    video decoder backend (its own one place) and the CPU stand-in's guard ask torch.cuda besides."""
    found = {str(p.relative_to(PACKAGE)): lines for p in PACKAGE.rglob("*.py") if (lines := _cuda_checks(p))}
    assert set(found) <= ALLOWED, {k: v for k, v in found.items() if k not in ALLOWED}
    assert len(found.get("backend.py", [])) == 1
