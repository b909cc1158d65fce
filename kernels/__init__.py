"""Triton kernels (with plain-PyTorch twins) for RL log-probs and the GRPO loss."""
