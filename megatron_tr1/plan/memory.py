"""Per-GPU memory of one GRPO training step under a TP x PP x DP layout, stage by stage (bytes).

Model states, with P the parameters one GPU holds on its stage (``params.stage_params``):
- weights: bf16, 2P; reference model: a frozen bf16 copy, 2P;
- grads: fp32 main grads in Megatron DDP's contiguous buffer, 4P (not sharded: the distributed optimizer
  reduce-scatters into that buffer);
- optimizer: Adam fp32 master weights + exp_avg + exp_avg_sq, 12P / DP (distributed optimizer).
Together 6 + 12/DP bytes per parameter, megatron-core's figure for 16-bit params with fp32 grads
(https://docs.nvidia.com/megatron-core/developer-guide/latest/distrib_optimizer.html), plus 2 for the reference.

Activations per decoder layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models"; bf16, sequence parallel so every term splits over TP, flash attention so no s^2 score
terms, dropout 0 so no masks) with s tokens, b sequences, hidden h, g query groups of head dim d, FFN width f:

    A_layer = s*b*(12h + 4gd + 6f) / TP bytes
      attention: norm input 2h + QKV input 2h + Q 2h + K, V 4gd + core-attention output 2h = 8h + 4gd
      SwiGLU MLP: norm input 2h + fc1 input 2h + gate|up output 4f + fc2 input 2f       = 4h + 6f
(for MHA, g*d = h, and a GELU MLP of f = 4h, where 6f becomes 4f, this is 32sbh/TP: the paper's 34sbh/TP with
selective recompute less its two 1-byte dropout masks). Where the query width q = heads x head_dim is not h
(Qwen3-VL-4B: 32 x 128 = 4096 against h = 2560) the Q and core-attention terms are 2q each: 8h + 4q + 4gd + 6f;
QK-norm (Qwen3) keeps its inputs too, + 2q + 2gd. A vision block is the same with g*d = q = h_v over
s_v = visual_tokens * merge^2 patches per sequence, and 4f for a GELU MLP (Qwen3-VL: fc1 output and GELU output).
Full recompute keeps only each layer's input, 2sbh/TP, plus one layer's A_layer while it is recomputed in backward. Under 1F1B, stage i holds PP - i micro-batches
in flight (at least PP micro-batches per step assumed), so stage 0 carries the most: the vision tower plus
PP * L/PP layers. Embedding, final-norm and patch-merger (Qwen3-VL's DeepStack mergers too) activations are small
and left out.

Logits (last stage, b*s tokens): unfused, the policy, old and reference passes each materialise fp32
[tokens, V/TP] logits, 3 * b*s * V/TP * 4 bytes; the fused linear-log-prob kernels keep only per-token fp32
statistics (log-prob, log-sum-exp, entropy), 3 * b*s * 3 * 4 bytes.

vLLM (colocated): while awake it holds ``vllm_fraction`` of the GPU (its weights and KV cache). Without sleep mode
that reservation stays through training: peak = train + vLLM. With sleep mode it is freed during training, but the
model states stay resident while it generates: peak = max(train, states + vLLM). Whether the engine's own weights
and KV cache fit in that share at a rollout TP is ``plan/rollout.py``'s question.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tr1.plan.models import ModelSpec
from megatron_tr1.plan.params import stage_params

GiB = 2 ** 30
BF16, FP32 = 2, 4
ADAM_STATE_BYTES = 3 * FP32  # master weights, exp_avg, exp_avg_sq
LOGIT_STATS = 3  # log-prob, log-sum-exp, entropy per token
PASSES = 3  # policy, old policy, reference


@dataclass(frozen=True)
class Workload:
    """What one micro-batch looks like and how the step is run."""

    seq_len: int = 6144  # prompt 4096 + response 2048
    micro_batch: int = 1  # sequences per micro-batch (with a token budget: the cap on them)
    visual_tokens: int = 2048  # LM tokens per sequence that come from the video (after the 2x2 merge)
    tokens_per_micro_batch: int = 0  # optim.max_tokens_per_micro_batch (packed); 0: micro_batch x seq_len
    recompute: bool = False
    fused_logits: bool = True
    vllm_fraction: float = 0.5
    vllm_sleep: bool = True
    gpu_mem_gib: float = 80.0
    headroom: float = 0.1  # share of the GPU kept free for CUDA context, NCCL buffers, fragmentation
    # the rollout side (plan/rollout.py): the step's prompts and samples, or sequences per replica when given
    rollout_prompts: int = 16  # rollout.prompts_per_step
    rollout_n: int = 8  # rollout.n
    rollout_batch: int | None = None  # sequences in flight per replica; None: ceil(prompts / replicas) x n
    rollout_overhead_gib: float = 2.0  # vLLM besides weights and KV (activations, CUDA graphs); assumed

    @property
    def tokens(self) -> int:
        """LM tokens of one micro-batch: the token budget when there is one (packed, no padding), else
        sequences x sequence length."""
        return self.tokens_per_micro_batch or self.micro_batch * self.seq_len

    @property
    def patches(self) -> int:
        """Video patches of one micro-batch: every sequence of it (at most ``micro_batch``, and no more than the
        budget holds) has ``visual_tokens`` x merge^2 of them; ``merge`` is applied by the caller."""
        seqs = self.micro_batch
        if self.tokens_per_micro_batch and self.visual_tokens:
            seqs = min(seqs, self.tokens_per_micro_batch // self.visual_tokens)
        return seqs * self.visual_tokens

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GiB * (1.0 - self.headroom)

    @property
    def vllm_share_bytes(self) -> float:
        """What a colocated vLLM engine may use while awake: ``rollout.gpu_memory_utilization`` x the GPU."""
        return self.vllm_fraction * self.gpu_mem_gib * GiB


@dataclass(frozen=True)
class Breakdown:
    """Bytes on one GPU of one pipeline stage; ``peak`` follows the workload's recompute/fused/sleep choices."""

    stage: int
    weights: float
    grads: float
    optimizer: float
    ref: float
    act: float
    act_recompute: float
    logits_fused: float
    logits_unfused: float
    vllm: float
    workload: Workload

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ref

    @property
    def train(self) -> float:
        w = self.workload
        act = self.act_recompute if w.recompute else self.act
        return self.states + act + (self.logits_fused if w.fused_logits else self.logits_unfused)

    @property
    def peak_awake(self) -> float:
        return self.train + self.vllm

    @property
    def peak_sleep(self) -> float:
        return max(self.train, self.states + self.vllm)

    @property
    def peak(self) -> float:
        return self.peak_sleep if self.workload.vllm_sleep else self.peak_awake


def layer_activation_bytes(tokens: int, hidden: int, kv_width: int, ffn: int, tp: int, q_width: int | None = None,
                           gated: bool = True, qk_norm: bool = False) -> float:
    """A_layer of the module docstring; ``kv_width`` = query groups x head dim, ``q_width`` = heads x head dim
    (default ``hidden``); ``gated``: a SwiGLU MLP (6f), else GELU (4f); ``qk_norm``: the q and k norms' inputs."""
    q = hidden if q_width is None else q_width
    norms = 2 * q + 2 * kv_width if qk_norm else 0
    return tokens * (8 * hidden + 4 * q + 4 * kv_width + (6 if gated else 4) * ffn + norms) / tp


def activation_bytes(spec: ModelSpec, w: Workload, tp: int, pp: int, stage: int, recompute: bool) -> float:
    """Activations held by one GPU of ``stage`` at the 1F1B peak."""
    t, v = spec.text, spec.vision
    tokens = w.tokens
    in_flight = pp - stage
    blocks = [(tokens, t.hidden, t.kv_heads * t.head_dim, t.ffn, t.layers // pp,
               dict(q_width=t.q_width, qk_norm=t.qk_norm))]
    if stage == 0:
        patches = w.patches * v.merge ** 2
        blocks.append((patches, v.hidden, v.hidden, v.ffn, v.depth, dict(gated=v.gated)))
    total = 0.0
    for n, h, kv, f, count, shape in blocks:
        full = layer_activation_bytes(n, h, kv, f, tp, **shape)
        if recompute:
            total += in_flight * count * n * h * BF16 / tp + full
        else:
            total += in_flight * count * full
    return total


def logits_bytes(tokens: int, vocab: int, tp: int, fused: bool) -> float:
    """Log-prob memory of the policy, old and reference passes on the last stage."""
    per_pass = tokens * LOGIT_STATS * FP32 if fused else tokens * vocab / tp * FP32
    return PASSES * per_pass


def stage_breakdowns(spec: ModelSpec, w: Workload, tp: int, pp: int, dp: int) -> list[Breakdown]:
    """One ``Breakdown`` per pipeline stage."""
    tokens = w.tokens
    out = []
    for stage, p in enumerate(stage_params(spec, tp, pp)):
        last = stage == pp - 1
        out.append(Breakdown(
            stage=stage,
            weights=BF16 * p,
            grads=FP32 * p,
            optimizer=ADAM_STATE_BYTES * p / dp,
            ref=BF16 * p,
            act=activation_bytes(spec, w, tp, pp, stage, recompute=False),
            act_recompute=activation_bytes(spec, w, tp, pp, stage, recompute=True),
            logits_fused=logits_bytes(tokens, spec.text.vocab, tp, fused=True) if last else 0.0,
            logits_unfused=logits_bytes(tokens, spec.text.vocab, tp, fused=False) if last else 0.0,
            vllm=w.vllm_share_bytes,
            workload=w,
        ))
    return out


def layout_peak(stages: list[Breakdown]) -> float:
    """A layout fits when its fullest stage does."""
    return max(b.peak for b in stages)


def max_vllm_share(stages: list[Breakdown]) -> float:
    """The largest vLLM share (bytes) this layout leaves on its fullest stage: usable - model states with sleep
    mode (the engine generates beside the resident states), usable - train without (it stays beside training);
    0 when training alone does not fit."""
    w = stages[0].workload
    if max(b.train for b in stages) > w.usable_bytes:
        return 0.0
    beside = max(b.states if w.vllm_sleep else b.train for b in stages)
    return max(0.0, w.usable_bytes - beside)
