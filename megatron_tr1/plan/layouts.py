"""Candidate TP x PP x DP layouts for a cluster, and the recommended one.

TP must divide the attention heads, the query groups, the vocabulary, the vision heads, both FFN widths and the
vision merger's width (megatron-core's column-parallel linears assert it; Qwen2.5-VL's vision FFN of 3420 = 4 * 855
rules out training TP 8; Qwen3-VL's 4096 / 4304 and 8 query groups allow it), and ``--gpus-per-node`` so a TP group
never leaves a node. PP must divide the decoder layers, and for Qwen3-VL leave on the first stage (with the vision
tower) every LM layer DeepStack adds vision features to: layers 0 .. k-1 for k ``deepstack_visual_indexes``
(``pp_blockers``). TP * PP must divide the GPU count; DP is the rest. A layout also needs a rollout TP whose vLLM
engine fits its share (``plan/rollout.py``: that TP needs only the language model's sizes divided; a vision tower it
does not divide runs whole on every rank): ``recommend`` takes that answer as ``rollout_fits``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_tr1.errors import ConfigError
from megatron_tr1.plan.memory import Breakdown, layout_peak
from megatron_tr1.plan.models import ModelSpec


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def text_blockers(spec: ModelSpec, tp: int) -> list[str]:
    """Why ``tp`` cannot split the language model (heads, KV heads, vocabulary, FFN); empty when it can. The rollout
    engine needs only these (``Dims.validate(..., vision=False)`` in ``rl/trainer.py``)."""
    t = spec.text
    sizes = [("num_attention_heads", t.heads), ("num_key_value_heads", t.kv_heads), ("vocab_size", t.vocab),
             ("intermediate_size", t.ffn)]
    return [f"{name} {n} is not divisible by {tp}" for name, n in sizes if n % tp]


def vision_blockers(spec: ModelSpec, tp: int) -> list[str]:
    """Why ``tp`` cannot split the vision tower (heads, FFN, merger width; ``Dims.vision_splits``); empty when it
    can. Training refuses such a TP; the rollout engine runs the tower whole on every rank instead."""
    v = spec.vision
    sizes = [("vision num_heads", v.heads), ("vision intermediate_size", v.ffn),
             ("vision merger width", v.hidden * v.merge ** 2)]
    return [f"{name} {n} is not divisible by {tp}" for name, n in sizes if n % tp]


def model_blockers(spec: ModelSpec, tp: int) -> list[str]:
    """Why ``tp`` cannot shard this model for training (megatron's and the trainer's ``Dims.validate`` rules: the
    language model and the vision tower); empty when it can."""
    return text_blockers(spec, tp) + vision_blockers(spec, tp)


def tp_blockers(spec: ModelSpec, tp: int, gpus_per_node: int) -> list[str]:
    """Why ``tp`` cannot shard this model on these nodes; empty when it can."""
    return model_blockers(spec, tp) + ([f"--gpus-per-node {gpus_per_node} is not divisible by {tp}"]
                                       if gpus_per_node % tp else [])


def pp_blockers(spec: ModelSpec, pp: int) -> list[str]:
    """Why ``pp`` cannot split this model's decoder layers (it must divide them; with DeepStack, the first stage
    must hold the LM layers DeepStack feeds); empty when it can."""
    layers, fed = spec.text.layers, len(spec.vision.deepstack)
    if layers % pp:
        return [f"{layers} decoder layers are not divisible by {pp}"]
    if layers // pp < fed:
        return [f"DeepStack adds vision features to LM layers 0-{fed - 1}, which must sit on pipeline stage 0 with "
                f"the vision tower, but {pp} stages leave stage 0 {layers // pp} of the {layers} layers"]
    return []


def excluded_pp(spec: ModelSpec) -> dict[int, list[str]]:
    """The PP sizes dividing the decoder layers that ``pp_blockers`` still rules out, with their reasons."""
    return {p: reasons for p in divisors(spec.text.layers) if (reasons := pp_blockers(spec, p))}


def enumerate_layouts(spec: ModelSpec, gpus_per_node: int, nodes: int, tp: int | None = None,
                      pp: int | None = None) -> tuple[list[Layout], dict[int, list[str]]]:
    """Valid layouts (optionally pinned to ``tp`` / ``pp``), and the TP sizes ruled out with their reasons."""
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError(f"--gpus-per-node {gpus_per_node} and --nodes {nodes} must both be at least 1")
    world = gpus_per_node * nodes
    layers = spec.text.layers
    if tp is not None:
        if tp < 1 or tp > gpus_per_node:
            raise ConfigError(f"--tp {tp}: must be between 1 and --gpus-per-node {gpus_per_node}")
        if reasons := tp_blockers(spec, tp, gpus_per_node):
            raise ConfigError(f"--tp {tp} cannot shard {spec.name}: " + "; ".join(reasons))
    if pp is not None and (pp < 1 or layers % pp):
        raise ConfigError(f"--pp {pp}: must divide the {layers} decoder layers of {spec.name}")
    if pp is not None and (reasons := pp_blockers(spec, pp)):
        raise ConfigError(f"--pp {pp} cannot split {spec.name}: " + "; ".join(reasons))
    if tp is not None and pp is not None and world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the {world} GPUs "
                          f"({nodes} nodes x {gpus_per_node})")
    excluded = {}
    layouts = []
    for t in [tp] if tp is not None else divisors(gpus_per_node):
        if reasons := tp_blockers(spec, t, gpus_per_node):
            excluded[t] = reasons
            continue
        for p in [pp] if pp is not None else divisors(layers):
            if world % (t * p) == 0 and not pp_blockers(spec, p):
                layouts.append(Layout(t, p, world // (t * p)))
    if not layouts:
        raise ConfigError(f"--pp {pp} does not divide the {world} GPUs ({nodes} nodes x {gpus_per_node})")
    return sorted(layouts, key=rank_key), excluded


def rank_key(layout: Layout) -> tuple[int, int]:
    """Smallest model-parallel size first; at equal TP * PP, more TP (inside a node, no pipeline bubble)."""
    return layout.tp * layout.pp, -layout.tp


def recommend(rows: list[tuple[Layout, list[Breakdown]]], usable_bytes: float,
              rollout_fits: Callable[[Layout], bool] | None = None) -> Layout | None:
    """The best-ranked layout whose every stage fits in ``usable_bytes`` (and, when ``rollout_fits`` is given, whose
    rollout engine fits too); most DP follows from the smallest TP * PP."""
    fitting = [layout for layout, stages in rows if layout_peak(stages) <= usable_bytes
               and (rollout_fits is None or rollout_fits(layout))]
    return min(fitting, key=rank_key) if fitting else None
