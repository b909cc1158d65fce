"""megatron-tr1: Temporal-R1 (GRPO for video temporal grounding) on Qwen2.5-VL with megatron-core."""
__version__ = "0.1.0"
