"""The models on megatron-core: Qwen2.5-VL (``models.qwen2_5_vl``) and Qwen3-VL dense (``models.qwen3_vl``).

``build_model(hf_config, **kwargs)`` builds this rank's model of the family ``models.family.family_of`` reads from
the config's ``model_type``; ``kwargs`` are the models' shared constructor arguments (``layer_spec``,
``params_dtype``, ``cpu_init``, ``sequence_parallel``, ``recompute``).
"""
from __future__ import annotations


def build_model(hf_config, **kwargs):
    """``Qwen2_5_VLModel`` or ``Qwen3VLModel`` for ``hf_config`` (a transformers config; parallel state initialised)."""
    from megatron_tr1.models.family import QWEN3_VL, family_of

    if family_of(hf_config, "HF config") == QWEN3_VL:
        from megatron_tr1.models.qwen3_vl import Qwen3VLModel

        return Qwen3VLModel(hf_config, **kwargs)
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    return Qwen2_5_VLModel(hf_config, **kwargs)
