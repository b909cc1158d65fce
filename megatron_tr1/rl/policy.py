"""The policy: this rank's ``Qwen2_5_VLModel`` built for the backend, and where its first weights come from.

- ``build_policy(hf_config, model_cfg, backend)``: the model with the backend's layer spec and dtype on its
  device, parts frozen as ``model.freeze_*`` says. Weights are loaded and saved through ``convert.weights`` (one
  loader for every source and spelling).
- ``model_source(path)``: what ``model.hf_dir`` names - an HF folder, or a tr1 Megatron checkpoint folder (whose
  ``hf/`` holds the config and tokenizer) - as ``(side-file folder, weights source)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_tr1.backend import Backend
from megatron_tr1.convert.checkpoint import HF_SUBDIR, META


def model_source(path: str | Path) -> tuple[Path, Path]:
    """``(folder with config.json and the tokenizer, folder the weights load from)`` for ``model.hf_dir``: the same
    HF folder twice, or a tr1 Megatron checkpoint's ``hf/`` and the checkpoint itself."""
    path = Path(path)
    if (path / META).is_file():
        return path / HF_SUBDIR, path
    return path, path


def build_policy(hf_config, model_cfg, backend: Backend) -> torch.nn.Module:
    """This rank's model (parallel state initialised), frozen as ``model_cfg.freeze_*`` says, on the device."""
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    model = Qwen2_5_VLModel(hf_config, layer_spec=backend.layer_spec, params_dtype=backend.dtype,
                            cpu_init=not backend.cuda, recompute=model_cfg.recompute)
    model.freeze(model_cfg.freeze_vision, model_cfg.freeze_merger, model_cfg.freeze_llm)
    return model.to(backend.device)
