"""Memory planner (``tr1 plan``): per-GPU memory of TP x PP x DP layouts for Qwen2.5-VL (and Qwen3-VL, planned only)
GRPO, and a recommendation.

models.py (shapes, config.json) -> params.py (counts, TP/PP shards) -> memory.py (bytes per stage)
-> layouts.py (candidates, recommendation) -> cli.py (table).
"""
from megatron_tr1.plan.cli import add_arguments, main

__all__ = ["add_arguments", "main"]
