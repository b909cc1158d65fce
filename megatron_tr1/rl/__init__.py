"""GRPO and SFT training."""
