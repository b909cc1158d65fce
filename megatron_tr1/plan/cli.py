"""``tr1 plan``: per-GPU memory of each candidate TP x PP x DP layout and of the colocated rollout engine at each
rollout TP, and a recommended layout with the smallest rollout TP that fits."""
from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console
from rich.table import Table

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.family import NAMES, SUPPORTED
from megatron_tr1.plan.layouts import Layout, enumerate_layouts, excluded_pp, rank_key, recommend, vision_blockers
from megatron_tr1.plan.memory import BF16, Breakdown, GiB, Workload, layout_peak, max_vllm_share, stage_breakdowns
from megatron_tr1.plan.models import BUILTIN, ModelSpec, load_model
from megatron_tr1.plan.params import total_params, vision_tower
from megatron_tr1.plan.rollout import RolloutEstimate, pick_rollout, rollout_estimate, rollout_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"{' | '.join(BUILTIN)} | HF checkpoint dir (with config.json)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--seq-len", type=int, default=6144, help="tokens per sequence, prompt + response (default 6144)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per micro-batch (default 1; with --tokens-per-micro-batch, the cap on them)")
    p.add_argument("--tokens-per-micro-batch", type=int, default=0,
                   help="optim.max_tokens_per_micro_batch: packed micro-batches of this many tokens size the "
                        "activations and log-probs instead of --micro-batch x --seq-len (default 0: off)")
    p.add_argument("--visual-tokens", type=int, default=2048,
                   help="LM tokens per sequence from the video, after the 2x2 merge (default 2048)")
    p.add_argument("--recompute", action="store_true", help="count activations under full recompute")
    p.add_argument("--unfused-logits", action="store_true",
                   help="count fp32 [tokens, V/TP] logits x3 (policy/old/ref) instead of the fused kernels")
    p.add_argument("--vllm-mem-fraction", type=float, default=0.5,
                   help="share of each GPU the colocated vLLM engine holds while awake (default 0.5)")
    p.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM sleep mode frees its share during training (default on)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of each GPU kept free for CUDA context, NCCL, fragmentation (default 0.1)")
    p.add_argument("--tp", type=int, help="only consider this tensor-parallel size")
    p.add_argument("--pp", type=int, help="only consider this pipeline-parallel size")
    p.add_argument("--rollout-tp", type=int,
                   help="check only this rollout.tensor_parallel (vLLM ranks per replica; default: the smallest that "
                        "fits; the table also shows each layout's own TP, rollout.tensor_parallel: null)")
    p.add_argument("--rollout-prompts", type=int, default=16,
                   help="prompts per step, rollout.prompts_per_step (default 16); each replica gets its slice")
    p.add_argument("--rollout-n", type=int, default=8, help="responses per prompt, rollout.n (default 8)")
    p.add_argument("--rollout-batch", type=int,
                   help="sequences in flight per rollout replica (default: ceil(--rollout-prompts / replicas) x "
                        "--rollout-n, the step's share; fewer: vLLM queues the rest, slower)")
    p.add_argument("--rollout-overhead", type=float, default=2.0,
                   help="GiB per GPU vLLM uses besides weights and KV cache: activations, CUDA graphs, sampler "
                        "(default 2, an assumption)")


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Validate the numeric flags; each bad value names its flag."""
    for flag, value in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch),
                        ("--rollout-prompts", args.rollout_prompts), ("--rollout-n", args.rollout_n),
                        ("--rollout-batch", 1 if args.rollout_batch is None else args.rollout_batch)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if not args.rollout_overhead >= 0:
        raise ConfigError(f"--rollout-overhead {args.rollout_overhead}: must be a non-negative number of GiB")
    if args.tokens_per_micro_batch and args.tokens_per_micro_batch < args.seq_len:
        raise ConfigError(f"--tokens-per-micro-batch {args.tokens_per_micro_batch}: must hold one whole sequence "
                          f"(--seq-len {args.seq_len}) or be 0, as optim.max_tokens_per_micro_batch must")
    if not 0 <= args.visual_tokens <= args.seq_len:
        raise ConfigError(f"--visual-tokens {args.visual_tokens}: must be between 0 and --seq-len {args.seq_len}")
    if not args.gpu_mem > 0:
        raise ConfigError(f"--gpu-mem {args.gpu_mem}: must be a positive number of GiB")
    for flag, value in (("--vllm-mem-fraction", args.vllm_mem_fraction), ("--headroom", args.headroom)):
        if not 0 <= value < 1:
            raise ConfigError(f"{flag} {value}: must be in [0, 1)")
    return Workload(seq_len=args.seq_len, micro_batch=args.micro_batch, visual_tokens=args.visual_tokens,
                    tokens_per_micro_batch=args.tokens_per_micro_batch,
                    recompute=args.recompute, fused_logits=not args.unfused_logits,
                    vllm_fraction=args.vllm_mem_fraction, vllm_sleep=args.vllm_sleep, gpu_mem_gib=args.gpu_mem,
                    headroom=args.headroom, rollout_prompts=args.rollout_prompts, rollout_n=args.rollout_n,
                    rollout_batch=args.rollout_batch, rollout_overhead_gib=args.rollout_overhead)


def describe(spec: ModelSpec) -> str:
    t, v = spec.text, spec.vision
    qk_norm = f", head_dim {t.head_dim}, QK-norm" if t.qk_norm else ""
    deepstack = f", DeepStack from blocks {list(v.deepstack)}" if v.deepstack else ""
    return (f"{spec.name} ({NAMES[spec.family]}): LM hidden {t.hidden}, {t.layers} layers, {t.heads} heads / "
            f"{t.kv_heads} query groups{qk_norm}, FFN {t.ffn}, vocab {t.vocab} ({'tied' if t.tied else 'untied'}); "
            f"vision {v.depth} blocks x {v.hidden}, {v.heads} heads, FFN {v.ffn}{deepstack}")


def main(args: argparse.Namespace) -> int:
    spec = load_model(args.model)
    w = workload_from_args(args)
    layouts, excluded = enumerate_layouts(spec, args.gpus_per_node, args.nodes, args.tp, args.pp)
    world = args.gpus_per_node * args.nodes
    rollouts, rollout_excluded = rollout_options(spec, w, world, args.rollout_tp)
    pick = pick_rollout(rollouts)
    own_tp = {layout.tp: rollout_estimate(spec, w, layout.tp, world) for layout in layouts}
    rows = [(layout, stage_breakdowns(spec, w, layout.tp, layout.pp, layout.dp)) for layout in layouts]
    train_best = recommend(rows, w.usable_bytes)
    best = recommend(rows, w.usable_bytes, rollout_fits=lambda layout: pick is not None)

    n, n_vision = total_params(spec), vision_tower(spec.vision).total
    print(describe(spec))
    if spec.family not in SUPPORTED:
        print(f"note: {NAMES[spec.family]} is planned only: tr1 train / eval / convert / verify do not run it yet "
              "(issue 23)")
    print(f"params={n}")
    print(f"({n / 1e9:.2f}B: vision {n_vision / 1e9:.3f}B, language {(n - n_vision) / 1e9:.3f}B)")
    micro = (f"packed micro-batches of {w.tokens_per_micro_batch} tokens (<= {w.micro_batch} sequences of <= "
             f"{w.seq_len}, {w.visual_tokens} visual each)" if w.tokens_per_micro_batch else
             f"micro-batch {w.micro_batch} x {w.seq_len} tokens ({w.visual_tokens} visual)")
    print(f"cluster: {args.nodes} node(s) x {args.gpus_per_node} GPUs x {w.gpu_mem_gib:g} GiB, usable "
          f"{w.usable_bytes / GiB:.1f} GiB per GPU ({w.headroom:.0%} headroom); {micro}; recompute {'on' if w.recompute else 'off'}; "
          f"{'fused' if w.fused_logits else 'unfused'} log-probs; vLLM {w.vllm_fraction:.2f} of the GPU, "
          f"sleep mode {'on' if w.vllm_sleep else 'off'}")
    step = (f"{w.rollout_batch} sequences per replica" if w.rollout_batch is not None else
            f"step of {w.rollout_prompts} prompts x n={w.rollout_n} over world / rollout TP replicas")
    print(f"rollout: vLLM on every rank, share {w.vllm_share_bytes / GiB:.1f} GiB per GPU (--vllm-mem-fraction "
          f"{w.vllm_fraction:g} x {w.gpu_mem_gib:g} GiB); {step}, {w.seq_len} tokens each; "
          f"overhead {w.rollout_overhead_gib:g} GiB")
    for tp, reasons in excluded.items():
        print(f"excluded TP={tp}: {'; '.join(reasons)}")
    for pp, reasons in excluded_pp(spec).items():
        print(f"excluded PP={pp}: {'; '.join(reasons)}")
    for tp, reasons in rollout_excluded.items():
        print(f"excluded rollout TP={tp}: {'; '.join(reasons)}")
    for r in rollouts:
        if r.vision_whole:
            whole = BF16 * vision_tower(spec.vision).total
            print(f"rollout TP={r.tp}: vision whole: {'; '.join(vision_blockers(spec, r.tp))}, so vLLM runs the "
                  f"vision tower data-parallel (mm_encoder_tp_mode=data): its {whole / GiB:.1f} GiB of bf16 "
                  f"weights undivided on every GPU")
    console = _console()
    console.print(_rollout_table(rollouts, pick))
    console.print(_table(rows, best, w, pick, own_tp))
    if pick is None:
        print(_rollout_refusal(rollouts, rollout_excluded, w))
    if best is not None:
        peak = layout_peak(dict(rows)[best])
        print(f"recommended: TP={best.tp} PP={best.pp} DP={best.dp} "
              f"(peak {peak / GiB:.1f} GiB of {w.usable_bytes / GiB:.1f} GiB usable), rollout {pick.label}: "
              f"{pick.replicas} replicas x {pick.seqs} sequences, {pick.need / GiB:.1f} GiB of the "
              f"{pick.share / GiB:.1f} GiB vLLM share")
    elif train_best is None:
        print(f"recommended: none; no layout fits in {w.usable_bytes / GiB:.1f} GiB per GPU: try --recompute, "
              "more --nodes, or a smaller --vllm-mem-fraction")
    else:
        peak = layout_peak(dict(rows)[train_best])
        print(f"training alone: recommended: TP={train_best.tp} PP={train_best.pp} DP={train_best.dp} "
              f"(peak {peak / GiB:.1f} GiB of {w.usable_bytes / GiB:.1f} GiB usable)")
        print("recommended: none; the rollout engine fits beside no layout (rollout: refused, above)")
        hint = _share_hint(rows, rollouts, w)
        print(hint)
        if hint.startswith("hint: no --vllm-mem-fraction") and (batch := _batch_hint(rows, rollouts, w)):
            print(batch)
    return 0


def _rollout_refusal(rollouts: list[RolloutEstimate], excluded: dict[int, list[str]], w: Workload) -> str:
    which = "no rollout TP fits" if len(rollouts) > 1 or excluded else f"rollout {rollouts[0].label} does not fit"
    text = (f"rollout: refused: {which} the vLLM share of {w.vllm_share_bytes / GiB:.1f} GiB per GPU "
            f"(--vllm-mem-fraction {w.vllm_fraction:g} x {w.gpu_mem_gib:g} GiB): "
            + ", ".join(r.describe() for r in rollouts))
    if excluded:
        text += "; ruled out: " + ", ".join(f"TP={t} ({reasons[0]})" for t, reasons in excluded.items())
    return text


def _share_hint(rows: list[tuple[Layout, list[Breakdown]]], rollouts: list[RolloutEstimate], w: Workload) -> str:
    """The best layout whose training leaves room for some rollout TP, and the --vllm-mem-fraction that gives it."""
    gpu = w.gpu_mem_gib * GiB
    for layout, stages in sorted(rows, key=lambda row: rank_key(row[0])):
        room = max_vllm_share(stages)
        for r in sorted(rollouts, key=lambda r: r.tp):
            fraction = math.ceil(r.need / gpu * 100) / 100
            if fraction * gpu <= room and fraction < 1:
                return (f"hint: --vllm-mem-fraction {fraction:.2f} gives TP={layout.tp} PP={layout.pp} "
                        f"DP={layout.dp} with rollout {r.label} ({r.need / GiB:.1f} GiB of "
                        f"{fraction * gpu / GiB:.1f}; that layout leaves at most {room / GiB:.1f} GiB for vLLM)")
    smallest = min(rollouts, key=lambda r: r.need)
    rooms = [max_vllm_share(stages) for _, stages in rows]
    return (f"hint: no --vllm-mem-fraction helps: the smallest rollout need is {smallest.need / GiB:.1f} GiB "
            f"(rollout {smallest.label}) and the roomiest layout leaves {max(rooms) / GiB:.1f} GiB beside training; "
            f"try {'another --rollout-tp, ' if len(rollouts) == 1 else ''}more --nodes, a shorter --seq-len, "
            f"fewer --rollout-prompts or --rollout-batch")


def _batch_hint(rows: list[tuple[Layout, list[Breakdown]]], rollouts: list[RolloutEstimate], w: Workload
                ) -> str | None:
    """The best layout and rollout TP that fit with fewer sequences in flight per replica (``--rollout-batch``, the
    most that fit in the largest --vllm-mem-fraction that layout leaves room for); None when not even one does."""
    gpu = w.gpu_mem_gib * GiB
    for layout, stages in sorted(rows, key=lambda row: rank_key(row[0])):
        fraction = min(math.floor(max_vllm_share(stages) / gpu * 100) / 100, 0.99)
        for r in sorted(rollouts, key=lambda r: r.tp):
            per_seq = r.kv / r.seqs
            k = math.floor((fraction * gpu - r.weights - r.overhead) / per_seq)
            if 1 <= k < r.seqs:
                need = r.weights + k * per_seq + r.overhead
                return (f"hint: --rollout-batch {k} --vllm-mem-fraction {fraction:.2f} gives TP={layout.tp} "
                        f"PP={layout.pp} DP={layout.dp} with rollout {r.label} ({need / GiB:.1f} GiB of "
                        f"{fraction * gpu / GiB:.1f}): {k} of the replica's {r.seqs} sequences in flight, vLLM queues "
                        f"the rest (slower)")
    return None


def _console() -> Console:
    # A file or pipe gets a fixed width wide enough for every column; a terminal keeps its own width.
    return Console(width=None if sys.stdout.isatty() else 200)


def _gib_tp(r: RolloutEstimate) -> str:
    return f"{r.tp} ({r.need / GiB:.1f})" + (" vw" if r.vision_whole else "") + ("" if r.fits else " no")


def _rollout_table(rollouts: list[RolloutEstimate], pick: RolloutEstimate | None) -> Table:
    table = Table(title="rollout engine (vLLM) per GPU in GiB at each rollout TP; every rank hosts one worker",
                  caption="need = weights (bf16, whole model / TP; vision whole: the vision tower undivided) + KV "
                          "(bf16, sequences x tokens) + overhead; fits: need <= share")
    for name in ("rollout TP", "vision", "replicas", "prompts/replica", "seqs/replica", "weights", "KV", "overhead",
                 "need", "share", "fits"):
        table.add_column(name, justify="right")
    for r in sorted(rollouts, key=lambda r: r.tp):
        label = "best" if r == pick else ("yes" if r.fits else "no")
        style = "bold green" if r == pick else (None if r.fits else "dim")
        table.add_row(str(r.tp), "whole" if r.vision_whole else "split", str(r.replicas),
                      "-" if r.prompts is None else str(r.prompts), str(r.seqs),
                      *(f"{x / GiB:.1f}" for x in (r.weights, r.kv, r.overhead, r.need, r.share)), label,
                      style=style)
    return table


def _table(rows, best, w: Workload, pick: RolloutEstimate | None = None,
           own_tp: dict[int, RolloutEstimate] | None = None) -> Table:
    act = "act rc" if w.recompute else "act"
    logits = "logits" if w.fused_logits else "logits unf"
    peak = "peak sleep" if w.vllm_sleep else "peak awake"
    table = Table(title="per-GPU memory in GiB: first and last pipeline stage (middle stages hold less)", caption=(
        f"train = weights + grads + optim + ref + {act} + {logits}; peak awake = train + vLLM; "
        f"peak sleep = max(train, weights + grads + optim + ref + vLLM); rollout TP (GiB/GPU): the smallest "
        f"rollout TP whose vLLM need fits the share (vw: vision whole); at TP: rollout.tensor_parallel = the "
        f"layout's TP (null); fits: {peak} <= usable on every stage and a rollout TP fits"))
    for name in ("TP", "PP", "DP", "stage", "weights", "grads", "optim", "ref", "act", "act rc", "logits",
                 "logits unf", "vLLM", "peak awake", "peak sleep", "rollout TP (GiB/GPU)", "at TP", "fits"):
        table.add_column(name, justify="right", header_style="bold" if name in (act, logits, peak) else None)
    for layout, stages in rows:
        train_fits = layout_peak(stages) <= w.usable_bytes
        fits = train_fits and pick is not None
        label = "best" if layout == best else ("yes" if fits else ("no: rollout" if train_fits else "no"))
        style = "bold green" if layout == best else (None if fits else "dim")
        shown = stages if len(stages) == 1 else [stages[0], stages[-1]]
        rollout = ["none" if pick is None else _gib_tp(pick),
                   "" if own_tp is None else _gib_tp(own_tp[layout.tp])]
        for i, b in enumerate(shown):
            gib = [f"{x / GiB:.1f}" for x in (b.weights, b.grads, b.optimizer, b.ref, b.act, b.act_recompute,
                                              b.logits_fused, b.logits_unfused, b.vllm, b.peak_awake, b.peak_sleep)]
            head = [str(layout.tp), str(layout.pp), str(layout.dp)] if i == 0 else ["", "", ""]
            table.add_row(*head, str(b.stage), *gib, *(rollout if i == 0 else ["", ""]), label if i == 0 else "",
                          style=style, end_section=i == len(shown) - 1)
    return table
