"""Rollouts: the engine interface and types (``engine.py``), the engines (``vllm_engine.py``, ``hf_engine.py``),
``factory.make_engine``, who generates what (``placement.py``: every rank a rollout worker) and the weight sync
(``weight_sync.py``). Import the modules themselves; nothing is re-exported here, so importing one engine never
imports another."""
