"""``tr1 selftest``: every path this machine can run, checked against its reference, in one table.

One command to run first on a new machine or cluster node. Each check (``registry.CHECKS``) compares one path
with its twin and says pass / FAIL / skipped (with the reason: no CUDA GPU, transformer-engine not installed,
...), the measured value and the tolerance; ``selftest.json`` keeps every number, per-check seconds and the
machine's name. The checks live by subject:

- ``model_checks``: the megatron-core Qwen2.5-VL (``local``, and ``te`` on a GPU) against HF transformers.
- ``kernel_checks``: the Triton kernels against their PyTorch twins (interpreter on CPU, compiled on GPU),
  and at Qwen2.5-VL-3B shapes against eager PyTorch (time and peak memory).
- ``video_checks``: PyAV decode of a generated clip against its source frames; DALI ``mixed`` against PyAV.
- ``rollout_checks``: the HF / vLLM rollout engines after a weight sync against the trainer's log-probs.
- ``grpo_checks``: a 3-step GRPO run (``rl.train_cli.train``) on the tiny model, TP=1 and TP=2.

``runner`` runs them (megatron checks inside spawned ranks: ``launch.run_ranks``), ``report`` prints the table
and writes the JSON, ``cli`` is the subcommand.
"""
