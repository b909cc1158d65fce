"""``make_engine``: a rollout engine by name ("hf" or "vllm"), on the backend's device and in its dtype."""
from __future__ import annotations

from megatron_tr1.backend import Backend
from megatron_tr1.errors import ConfigError
from megatron_tr1.rollout.engine import ENGINES, RolloutEngine


def make_engine(kind: str, hf_config, tokenizer, backend: Backend, **kwargs) -> RolloutEngine:
    """``"hf"`` -> ``HFEngine``, ``"vllm"`` -> ``VLLMEngine`` on ``backend``'s device and dtype (``kwargs`` go to the
    engine: ``model_dir`` for both, ``seed``, ``max_model_len``, ``gpu_memory_utilization``, ... for vLLM)."""
    if kind == "hf":
        from megatron_tr1.rollout.hf_engine import HFEngine
        return HFEngine(hf_config, tokenizer, dtype=backend.dtype, device=str(backend.device), **kwargs)
    if kind == "vllm":
        from megatron_tr1.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(hf_config, tokenizer, dtype=backend.dtype, cuda=backend.cuda, **kwargs)
    raise ConfigError(f"rollout.engine={kind!r} is not one of {ENGINES}")
