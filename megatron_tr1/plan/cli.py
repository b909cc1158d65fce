"""``tr1 plan``: per-GPU memory of each candidate TP x PP x DP layout, and a recommended one."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from megatron_tr1.errors import ConfigError
from megatron_tr1.plan.layouts import enumerate_layouts, recommend
from megatron_tr1.plan.memory import GiB, Workload, layout_peak, stage_breakdowns
from megatron_tr1.plan.models import BUILTIN, ModelSpec, load_model
from megatron_tr1.plan.params import total_params, vision_tower


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"{' | '.join(BUILTIN)} | HF checkpoint dir (with config.json)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--seq-len", type=int, default=6144, help="tokens per sequence, prompt + response (default 6144)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
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


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Validate the numeric flags; each bad value names its flag."""
    for flag, value in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.visual_tokens <= args.seq_len:
        raise ConfigError(f"--visual-tokens {args.visual_tokens}: must be between 0 and --seq-len {args.seq_len}")
    if not args.gpu_mem > 0:
        raise ConfigError(f"--gpu-mem {args.gpu_mem}: must be a positive number of GiB")
    for flag, value in (("--vllm-mem-fraction", args.vllm_mem_fraction), ("--headroom", args.headroom)):
        if not 0 <= value < 1:
            raise ConfigError(f"{flag} {value}: must be in [0, 1)")
    return Workload(seq_len=args.seq_len, micro_batch=args.micro_batch, visual_tokens=args.visual_tokens,
                    recompute=args.recompute, fused_logits=not args.unfused_logits,
                    vllm_fraction=args.vllm_mem_fraction, vllm_sleep=args.vllm_sleep, gpu_mem_gib=args.gpu_mem,
                    headroom=args.headroom)


def describe(spec: ModelSpec) -> str:
    t, v = spec.text, spec.vision
    return (f"{spec.name}: LM hidden {t.hidden}, {t.layers} layers, {t.heads} heads / {t.kv_heads} query groups, "
            f"FFN {t.ffn}, vocab {t.vocab} ({'tied' if t.tied else 'untied'}); "
            f"vision {v.depth} blocks x {v.hidden}, {v.heads} heads, FFN {v.ffn}")


def main(args: argparse.Namespace) -> int:
    spec = load_model(args.model)
    w = workload_from_args(args)
    layouts, excluded = enumerate_layouts(spec, args.gpus_per_node, args.nodes, args.tp, args.pp)
    rows = [(layout, stage_breakdowns(spec, w, layout.tp, layout.pp, layout.dp)) for layout in layouts]
    best = recommend(rows, w.usable_bytes)

    n, n_vision = total_params(spec), vision_tower(spec.vision).total
    print(describe(spec))
    print(f"params={n}")
    print(f"({n / 1e9:.2f}B: vision {n_vision / 1e9:.3f}B, language {(n - n_vision) / 1e9:.3f}B)")
    print(f"cluster: {args.nodes} node(s) x {args.gpus_per_node} GPUs x {w.gpu_mem_gib:g} GiB, usable "
          f"{w.usable_bytes / GiB:.1f} GiB per GPU ({w.headroom:.0%} headroom); micro-batch {w.micro_batch} x "
          f"{w.seq_len} tokens ({w.visual_tokens} visual); recompute {'on' if w.recompute else 'off'}; "
          f"{'fused' if w.fused_logits else 'unfused'} log-probs; vLLM {w.vllm_fraction:.2f} of the GPU, "
          f"sleep mode {'on' if w.vllm_sleep else 'off'}")
    for tp, reasons in excluded.items():
        print(f"excluded TP={tp}: {'; '.join(reasons)}")
    _console().print(_table(rows, best, w))
    if best is None:
        print(f"recommended: none; no layout fits in {w.usable_bytes / GiB:.1f} GiB per GPU: try --recompute, "
              "more --nodes, or a smaller --vllm-mem-fraction")
    else:
        peak = layout_peak(dict(rows)[best])
        print(f"recommended: TP={best.tp} PP={best.pp} DP={best.dp} "
              f"(peak {peak / GiB:.1f} GiB of {w.usable_bytes / GiB:.1f} GiB usable)")
    return 0


def _console() -> Console:
    # A file or pipe gets a fixed width wide enough for every column; a terminal keeps its own width.
    return Console(width=None if sys.stdout.isatty() else 170)


def _table(rows, best, w: Workload) -> Table:
    act = "act rc" if w.recompute else "act"
    logits = "logits" if w.fused_logits else "logits unf"
    peak = "peak sleep" if w.vllm_sleep else "peak awake"
    table = Table(title="per-GPU memory in GiB: first and last pipeline stage (middle stages hold less)", caption=(
        f"train = weights + grads + optim + ref + {act} + {logits}; peak awake = train + vLLM; "
        f"peak sleep = max(train, weights + grads + optim + ref + vLLM); fits: {peak} <= usable on every stage"))
    for name in ("TP", "PP", "DP", "stage", "weights", "grads", "optim", "ref", "act", "act rc", "logits",
                 "logits unf", "vLLM", "peak awake", "peak sleep", "fits"):
        table.add_column(name, justify="right", header_style="bold" if name in (act, logits, peak) else None)
    for layout, stages in rows:
        fits = layout_peak(stages) <= w.usable_bytes
        label = "best" if layout == best else ("yes" if fits else "no")
        style = "bold green" if layout == best else (None if fits else "dim")
        shown = stages if len(stages) == 1 else [stages[0], stages[-1]]
        for i, b in enumerate(shown):
            gib = [f"{x / GiB:.1f}" for x in (b.weights, b.grads, b.optimizer, b.ref, b.act, b.act_recompute,
                                              b.logits_fused, b.logits_unfused, b.vllm, b.peak_awake, b.peak_sleep)]
            head = [str(layout.tp), str(layout.pp), str(layout.dp)] if i == 0 else ["", "", ""]
            table.add_row(*head, str(b.stage), *gib, label if i == 0 else "", style=style,
                          end_section=i == len(shown) - 1)
    return table
