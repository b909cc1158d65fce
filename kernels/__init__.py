"""Triton kernels (with plain-PyTorch twins) for RL log-probs and the GRPO loss.

Public API: ``fused_logprobs`` (log-prob + entropy from logits, optionally vocab-parallel),
``fused_linear_logprobs`` (the same from hidden states and the LM-head weight shard, never materialising
``[N, V]``), ``grpo_loss`` (fused PPO-clip / KL / entropy loss with statistics) and ``kernels.reference`` (the
plain-PyTorch versions). Each public function runs Triton where it can (CUDA tensors, or CPU tensors with
``TRITON_INTERPRET=1``) and the reference otherwise; ``kernels._dispatch`` makes that choice.
"""
from . import reference
from .grpo_loss import grpo_loss
from .linear_logprobs import fused_linear_logprobs
from .logprobs import fused_logprobs

__all__ = ["fused_logprobs", "fused_linear_logprobs", "grpo_loss", "reference"]
