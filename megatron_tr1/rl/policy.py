"""The policy: this rank's Megatron model (``Qwen2_5_VLModel`` or ``Qwen3VLModel``, ``models.build_model``) built
for the backend.

``build_policy(hf_config, model_cfg, backend)``: the model with the backend's layer spec and dtype on its device,
parts frozen as ``model.freeze_*`` says. Weights are loaded and saved through ``convert.weights`` (one loader for
every source and spelling); what ``model.hf_dir`` names (an HF folder or a tr1 checkpoint) is checked by
``convert.model_dir`` before anything is built.
"""
from __future__ import annotations

import torch

from megatron_tr1.backend import Backend


def build_policy(hf_config, model_cfg, backend: Backend) -> torch.nn.Module:
    """This rank's model (parallel state initialised), frozen as ``model_cfg.freeze_*`` says, on the device."""
    from megatron_tr1.models import build_model

    model = build_model(hf_config, layer_spec=backend.layer_spec, params_dtype=backend.dtype,
                        cpu_init=not backend.cuda, recompute=model_cfg.recompute)
    model.freeze(model_cfg.freeze_vision, model_cfg.freeze_merger, model_cfg.freeze_llm)
    return model.to(backend.device)
