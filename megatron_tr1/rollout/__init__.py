"""Rollout engines (``engine.py``: interface + vLLM, ``hf_engine.py``: pure PyTorch) and weight sync."""
from megatron_tr1.rollout.engine import (Response, RolloutEngine, RolloutPrompt, Sampling, VLLMEngine, build_prompt,
                                         make_engine)
from megatron_tr1.rollout.hf_engine import HFEngine
from megatron_tr1.rollout.weight_sync import DEFAULT_BUCKET_BYTES, SyncStats, sync_weights

__all__ = ["Response", "RolloutEngine", "RolloutPrompt", "Sampling", "VLLMEngine", "HFEngine", "build_prompt",
           "make_engine", "sync_weights", "SyncStats", "DEFAULT_BUCKET_BYTES"]
