"""The rollout side of a colocated GRPO step: vLLM's memory per GPU at a rollout tensor-parallel size ``t``.

Every rank of the job is a rollout worker (``rollout/placement.py``): ``R = W / t`` vLLM replicas of ``t``
consecutive ranks over the ``W`` GPUs, each replica generating its slice of the step's prompts. While awake, an
engine may use ``rollout.gpu_memory_utilization`` (``--vllm-mem-fraction``) x the GPU, and vLLM fills whatever its
weights and activations leave of that share with KV cache. A rollout TP ``t`` fits when, per GPU,

    need = weights + KV + overhead <= share = --vllm-mem-fraction x --gpu-mem

- weights: bf16, the whole model (vision tower included, no pipeline split) sharded like megatron's TP split:
  column/row-parallel matrices, QKV and column biases, the vocab-parallel embedding and LM head divided by ``t``;
  norms, row-parallel biases and the vision patch embedding replicated (``params.Count``). vLLM's split is the same
  for these shapes (its vocab padding to a multiple of 64 adds nothing at 151936 / 152064); buffers such as rotary
  caches are left out (covered by the overhead). When ``t`` does not divide the vision tower's sizes, vLLM runs the
  tower data-parallel (below): its weights count whole, undivided, on every GPU ("vision whole").
- KV: the sequences one replica generates at once, ``s_r`` = ceil(rollout prompts / R) x n (``--rollout-prompts``,
  ``--rollout-n``: the step's ``rollout.prompts_per_step`` and ``rollout.n``), or ``--rollout-batch`` when given;
  bf16 K and V of every decoder layer for the whole sequence (prompt + response, ``--seq-len``):
  ``s_r * seq_len * layers * 2 * (kv_heads / t) * head_dim * 2`` bytes. This is an upper bound: vLLM's prefix
  caching may share a prompt's blocks among its n samples. Less KV than this does not fail (vLLM queues the
  sequences that do not fit, which is slower) as long as one ``seq_len`` sequence fits; the planner asks for all
  of them in flight.
- overhead: ``--rollout-overhead`` GiB (default 2), an assumed, not measured, allowance for what vLLM profiles and
  reserves besides weights and KV: the activation peak of one scheduler step and the vision encoder (not split
  when it runs whole), sampler buffers, CUDA graphs, and the weight sync's bucket while it is fed.

Which ``t`` can run: it must divide the world (``W / t`` replicas on every rank; ``rl.config.check_layout``) and,
as the trainer checks before building the engine (``Dims.validate(..., vision=False)`` in ``rl/trainer.py``), the
language model's attention heads, KV heads, vocabulary and FFN width. vLLM alone would accept a ``t`` above the KV
heads (``QKVParallelLinear`` replicates each KV head ``t / kv_heads`` times), but the trainer refuses it. The
vision tower's sizes (heads, FFN, merger width; ``Dims.vision_splits``) need not divide: when one does not (the
vision FFN of 3420 at ``t`` = 8), the trainer builds the engine with ``vision_data_parallel`` and vLLM runs the
tower whole on every rank of the replica (``mm_encoder_tp_mode="data"``, ``rollout/vllm_engine.py``), which the
weights above count. Smaller ``t`` means more replicas, so the planner picks the smallest ``t`` that fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_tr1.errors import ConfigError
from megatron_tr1.plan.layouts import divisors, text_blockers, vision_blockers
from megatron_tr1.plan.memory import BF16, GiB, Workload
from megatron_tr1.plan.models import ModelSpec
from megatron_tr1.plan.params import Count, decoder_layer, vision_tower, word_embeddings


@dataclass(frozen=True)
class RolloutEstimate:
    """Bytes per GPU of one rollout engine at rollout TP ``tp`` in a world of ``replicas * tp`` GPUs."""

    tp: int
    replicas: int
    prompts: int | None  # per replica (None: --rollout-batch gives the sequences directly)
    seqs: int  # sequences in flight per replica
    weights: float
    kv: float
    overhead: float
    share: float  # --vllm-mem-fraction x --gpu-mem
    vision_whole: bool = False  # ``tp`` does not divide the vision tower: vLLM holds it whole on every GPU

    @property
    def need(self) -> float:
        return self.weights + self.kv + self.overhead

    @property
    def fits(self) -> bool:
        return self.need <= self.share

    @property
    def label(self) -> str:
        """``TP=8 (vision whole)`` or ``TP=4``."""
        return f"TP={self.tp}" + (" (vision whole)" if self.vision_whole else "")

    def describe(self) -> str:
        return (f"{self.label} needs {self.need / GiB:.1f} GiB ({self.weights / GiB:.1f} weights + "
                f"{self.kv / GiB:.1f} KV for {self.seqs} sequences + {self.overhead / GiB:.1f} overhead)")


def language_params(spec: ModelSpec) -> Count:
    """The language model of one vLLM engine: embedding, decoder layers, final norm and LM head (when untied)."""
    t = spec.text
    lm_head = Count() if t.tied else word_embeddings(t)
    return word_embeddings(t) + decoder_layer(t) * t.layers + Count(replicated=t.hidden) + lm_head


def engine_params(spec: ModelSpec) -> Count:
    """What one vLLM engine holds: the whole model, split into TP-sharded and replicated parameters."""
    return vision_tower(spec.vision) + language_params(spec)


def engine_params_per_gpu(spec: ModelSpec, tp: int, vision_whole: bool) -> int:
    """Parameters on one GPU of a rollout TP ``tp`` replica: the language model split over ``tp``; the vision tower
    split too, or whole when ``vision_whole`` (vLLM's ``mm_encoder_tp_mode="data"``)."""
    vision = vision_tower(spec.vision)
    return language_params(spec).per_gpu(tp) + (vision.total if vision_whole else vision.per_gpu(tp))


def kv_bytes_per_token(spec: ModelSpec, tp: int) -> float:
    """bf16 K and V of every decoder layer for one token, on one GPU of a rollout TP ``tp`` replica."""
    t = spec.text
    return t.layers * 2 * (t.kv_heads / tp) * t.head_dim * BF16


def replica_sequences(w: Workload, replicas: int) -> tuple[int | None, int]:
    """(prompts, sequences) one replica generates: its slice of the step's prompts times n, or --rollout-batch."""
    if w.rollout_batch is not None:
        return None, w.rollout_batch
    prompts = math.ceil(w.rollout_prompts / replicas)
    return prompts, prompts * w.rollout_n


def rollout_estimate(spec: ModelSpec, w: Workload, tp: int, world: int) -> RolloutEstimate:
    """The rollout engine's memory per GPU at rollout TP ``tp`` (``tp`` must divide ``world`` and the language
    model; a vision tower ``tp`` does not divide counts whole; see the module)."""
    replicas = world // tp
    prompts, seqs = replica_sequences(w, replicas)
    vision_whole = bool(vision_blockers(spec, tp))
    return RolloutEstimate(
        tp=tp, replicas=replicas, prompts=prompts, seqs=seqs,
        weights=BF16 * engine_params_per_gpu(spec, tp, vision_whole),
        kv=seqs * w.seq_len * kv_bytes_per_token(spec, tp),
        overhead=w.rollout_overhead_gib * GiB,
        share=w.vllm_share_bytes,
        vision_whole=vision_whole,
    )


def rollout_blockers(spec: ModelSpec, tp: int, world: int) -> list[str]:
    """Why rollout TP ``tp`` cannot run on ``world`` GPUs (the world and the language model's sizes; the vision
    tower's do not matter, see the module); empty when it can."""
    reasons = [f"the world size {world} is not divisible by {tp}"] if world % tp else []
    return reasons + text_blockers(spec, tp)


def rollout_options(spec: ModelSpec, w: Workload, world: int, tp: int | None = None
                    ) -> tuple[list[RolloutEstimate], dict[int, list[str]]]:
    """Estimates for every rollout TP that can run (or only ``tp``, which raises ConfigError when it cannot), smallest
    first, and the sizes ruled out with their reasons (divisors of the world up to the attention heads)."""
    if tp is not None:
        if tp < 1:
            raise ConfigError(f"--rollout-tp {tp}: must be at least 1")
        if world % tp:
            raise ConfigError(f"--rollout-tp {tp} (rollout.tensor_parallel) does not divide the world size {world}: "
                              f"every rank runs one rollout worker, world / rollout TP replicas")
        if reasons := text_blockers(spec, tp):
            raise ConfigError(f"--rollout-tp {tp} (rollout.tensor_parallel) cannot shard {spec.name}: "
                              + "; ".join(reasons))
        return [rollout_estimate(spec, w, tp, world)], {}
    options, excluded = [], {}
    for t in divisors(world):
        if t > spec.text.heads:
            break
        if reasons := rollout_blockers(spec, t, world):
            excluded[t] = reasons
        else:
            options.append(rollout_estimate(spec, w, t, world))
    return options, excluded


def pick_rollout(options: list[RolloutEstimate]) -> RolloutEstimate | None:
    """The smallest rollout TP that fits its share (most replicas); None when none does."""
    return next((r for r in sorted(options, key=lambda r: r.tp) if r.fits), None)
