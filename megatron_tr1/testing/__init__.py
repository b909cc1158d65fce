"""Test support only (never imported by production code): the tiny models as megatron-core models with a matching
video batch (``tiny_model``). Multi-rank runs use ``megatron_tr1.launch.run_ranks``; the tiny HF models and the
tokenizer are the demo's (``megatron_tr1.demo``)."""
