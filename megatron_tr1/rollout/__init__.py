"""Rollouts: the engine interface and types (``engine.py``), the engines (``vllm_engine.py``, ``hf_engine.py``),
``factory.make_engine``, one engine per model-parallel group (``shared.py``) and the weight sync (``weight_sync.py``).
Import the modules themselves; nothing is re-exported here, so importing one engine never imports another."""
