"""Benchmark padded vs packed micro-batches (``optim.packing``) in real GRPO steps at a Temporal-R1-like length spread.

The step is ``tools/bench_step.py``'s; its engine keeps the real weight sync but does not sample: ``ScheduleEngine`` returns responses of fixed lengths spread evenly
from 5% to 100% of ``--max-tokens`` over the step's prompts x n samples, shuffled (seeded by the step; random
ordinary token ids, ending with ``<|im_end|>`` unless at ``max_tokens``; engine log-probs 0, so the mismatch
metrics mean nothing), on the fixed-length video prompts. The model is the tiny one scaled (``--hidden``,
``--layers``; FFN 2 x hidden and 4 heads, the demo's proportions). Each configuration runs real ``grpo_step``s:
padded (``optim.packing=false``) and packed, with ``optim.micro_batch_size`` sequences per micro-batch, with a
token budget (``optim.max_tokens_per_micro_batch``, default micro-batch x (prompt + max_tokens), as the recipes set
it) under that sequence cap, and with the budget alone (cap lifted to the whole batch). One warm-up step per
configuration, then ``--repeats`` rounds, each running every configuration once on the same sequences (the order
rotated each round); the table shows medians of ``time/logprob`` + ``time/update`` and the speed against padded
(ratio of medians; and the median, min and max of the per-round ratios). Slots = token positions the model's
projections and MLP compute (input_ids numel: tokens + padding), ``pad_fraction`` = padding / slots
(``batch/pad_fraction``); attention slots = sum over micro-batches of sequences x longest^2: the score matrix the
CPU ``local`` spec computes in both layouts (``PackedDotProductAttention`` lays packed sequences out as padded
rows), where a varlen kernel (transformer-engine) would compute sum L^2.

    python tools/bench_packing.py                       # CPU: hidden 256, 4 layers, 4 prompts x 8, 512 tokens
    python tools/bench_packing.py --repeats 5 --max-tokens 256

Writes ``benchmarks/step_packing_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _bench_io import add_device_argument, check_device, machine_name, publish  # noqa: E402  (tools/ is on sys.path when run as a script)
from bench_step import add_size_arguments, build, length_reward, sizes, train_config  # noqa: E402

# GPU UNTESTED; CPU sized so log-prob + update dominate (about 13k tokens a step)
SIZES = {"cuda": dict(prompts=8, n=8, max_tokens=2048, repeats=3, micro_batch=4, hidden=1024, layers=8),
         "cpu": dict(prompts=4, n=8, max_tokens=512, repeats=5, micro_batch=4, hidden=256, layers=4)}
SPREAD_LOW = 0.05  # the shortest response: 5% of max_tokens


def spread_lengths(count: int, max_tokens: int, seed: int | None) -> list[int]:
    """``count`` response lengths spread evenly from ``SPREAD_LOW`` x ``max_tokens`` to ``max_tokens`` (at least 1
    token), in an order shuffled by ``seed``."""
    low = SPREAD_LOW * max_tokens
    lengths = [max(1, round(low + (max_tokens - low) * k / max(count - 1, 1))) for k in range(count)]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed or 0)).tolist()
    return [lengths[k] for k in order]


def _schedule_engine():
    from megatron_tr1.demo import TINY_SPECIAL_TOKENS
    from megatron_tr1.rollout.engine import Response
    from megatron_tr1.rollout.hf_engine import HFEngine

    class ScheduleEngine(HFEngine):
        """An ``HFEngine`` (real weight sync) whose ``generate`` returns ``spread_lengths`` responses instead of
        sampling: random ordinary token ids, ``<|im_end|>`` last unless the response is ``max_tokens`` long."""

        def generate(self, prompts, n, sampling, seeds=None):
            lengths = spread_lengths(len(prompts) * n, sampling.max_tokens, sampling.seed)
            self.last_lengths = lengths
            ordinary = torch.tensor([i for i in range(len(self.tokenizer)) if i not in TINY_SPECIAL_TOKENS.values()])
            generator = torch.Generator().manual_seed(sampling.seed or 0)
            out = []
            for i in range(len(prompts)):
                row = []
                for k in lengths[i * n:(i + 1) * n]:
                    ids = ordinary[torch.randint(len(ordinary), (k,), generator=generator)].tolist()
                    stop = k < sampling.max_tokens
                    if stop:
                        ids[-1] = self.stop_id
                    row.append(Response(token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                        logprobs=[0.0] * k, finish_reason="stop" if stop else "length"))
                out.append(row)
            return out

    return ScheduleEngine


def spread_configs(cfg: dict, batch: int, budget: int) -> list[dict]:
    """The compared configurations: padded / packed x (micro_batch sequences; budget under that cap; budget alone)."""
    mb = min(cfg["micro_batch"], batch)
    out = []
    for how, tokens, cap in ((f"{mb} seqs", 0, mb), (f"budget {budget}, <= {mb} seqs", budget, mb),
                             (f"budget {budget}", budget, batch)):
        for packing in (False, True):
            out.append(dict(name=f"{'packed' if packing else 'padded'}, {how}", packing=packing, budget=tokens,
                            cap=cap))
    return out


def partition(lengths: list[int], budget: int, cap: int) -> list[list[int]]:
    """The micro-batches ``rl.update.micro_batches`` makes of sequences of ``lengths`` (group-major order)."""
    from megatron_tr1.rl.batching import split_by_count, split_by_tokens

    return split_by_tokens(lengths, budget, cap) if budget else split_by_count(len(lengths), cap)


def layout_counts(lengths: list[int], parts: list[list[int]], packing: bool) -> dict:
    """Tokens, slots (token positions the projections and MLP compute), pad fraction and attention slots (sum of
    sequences x longest^2: the CPU ``local`` spec's score matrices in either layout; ``attn_varlen``: sum L^2)."""
    tokens = sum(lengths)
    widths = [max(lengths[i] for i in part) for part in parts]
    slots = tokens if packing else sum(len(part) * w for part, w in zip(parts, widths))
    return dict(micro_batches=len(parts), tokens=tokens, slots=slots, pad_fraction=1.0 - tokens / slots,
                attn_slots=sum(len(part) * w * w for part, w in zip(parts, widths)),
                attn_varlen=sum(n * n for n in lengths))


def run_spread(cfg: dict, device: str) -> tuple[list[dict], dict]:
    """``--spread``: every configuration of ``spread_configs``, one warm-up step each, then ``repeats`` rounds."""
    from megatron_tr1.rl.grpo import grpo_step

    b = build(cfg, device, engine_cls=_schedule_engine())
    prompt = max(len(i.prompt.input_ids) for i in b["items"])
    budget = cfg.get("budget") or min(cfg["micro_batch"], b["batch"]) * (prompt + cfg["max_tokens"])
    configs = spread_configs(cfg, b["batch"], budget)
    for c in configs:
        c["train"] = train_config(cfg, b["batch"], c["cap"], c["packing"], c["budget"], max_prompt_tokens=prompt)
    rows = []
    for rnd in range(cfg["repeats"] + 1):  # round 0: warm-up
        shift = rnd % len(configs)
        for c in configs[shift:] + configs[:shift]:
            m = grpo_step(b["policy"], b["optimizer"], b["engine"], b["ref"], b["items"], c["train"], b["tokenizer"],
                          b["hf"].config, step=rnd, reward_fn=length_reward, sync=b["backend"].sync)
            lengths = [len(i.prompt.input_ids) + k for i, k in zip(
                [i for i in b["items"] for _ in range(cfg["n"])], b["engine"].last_lengths)]
            counts = layout_counts(lengths, partition(lengths, c["budget"], c["cap"]), c["packing"])
            if (counts["micro_batches"], counts["tokens"]) != (m["batch/micro_batches"], m["batch/tokens"]) or \
                    abs(counts["pad_fraction"] - m["batch/pad_fraction"]) > 1e-9:
                raise RuntimeError(f"{c['name']}: the step's batch stats {m['batch/micro_batches']} micro-batches, "
                                   f"{m['batch/tokens']} tokens, pad {m['batch/pad_fraction']} differ from the "
                                   f"schedule's {counts}")
            row = dict(config=c["name"], round=rnd, warmup=rnd == 0, logprob=m["time/logprob"],
                       update=m["time/update"], step=m["time/step"], rollout=m["time/rollout"],
                       loss=m.get("loss"), **counts)
            rows.append(row)
            print(f"round {rnd} {c['name']}: logprob {row['logprob']:.2f} s + update {row['update']:.2f} s, "
                  f"{counts['micro_batches']} micro-batches, pad {counts['pad_fraction']:.1%}", file=sys.stderr)
    info = dict(params=b["counts"], patches_per_step=b["patches"], logprob_passes=b["passes"], prompt_tokens=prompt,
                budget=budget, configs=[{k: v for k, v in c.items() if k != "train"} for c in configs],
                response_lengths=f"{SPREAD_LOW:.0%}..100% of {cfg['max_tokens']}", world_size=1,
                model=dict(hidden=cfg["hidden"], layers=cfg["layers"], ffn=b["hf"].config.text_config.intermediate_size,
                           heads=b["hf"].config.text_config.num_attention_heads, vocab=b["hf"].config.text_config.vocab_size))
    return rows, info


def summarize_spread(rows: list[dict], configs: list[dict]) -> list[dict]:
    """Per configuration: the counts, medians of logprob, update and their sum, and the speed against the first
    (padded) configuration: ratio of medians and the per-round ratios (median, min, max)."""
    timed = [r for r in rows if not r["warmup"]]
    base = {r["round"]: r["logprob"] + r["update"] for r in timed if r["config"] == configs[0]["name"]}
    out = []
    for c in configs:
        mine = [r for r in timed if r["config"] == c["name"]]
        train = statistics.median(r["logprob"] + r["update"] for r in mine)
        ratios = [base[r["round"]] / (r["logprob"] + r["update"]) for r in mine]
        out.append({k: mine[0][k] for k in ("micro_batches", "tokens", "slots", "pad_fraction", "attn_slots",
                                             "attn_varlen")} | dict(
            config=c["name"], logprob=statistics.median(r["logprob"] for r in mine),
            update=statistics.median(r["update"] for r in mine), train=train,
            train_all=[r["logprob"] + r["update"] for r in mine], speedup=None, paired=ratios))
    for s in out:
        s["speedup"] = out[0]["train"] / s["train"]
    return out


SPREAD_HEADER = ["configuration", "micro-batches", "tokens", "slots", "pad_fraction", "attn slots (M)", "logprob s",
                 "update s", "logprob+update s", "speed vs padded", "per-round ratio (min-max)"]


def spread_cells(s: dict) -> list[str]:
    paired = s["paired"]
    return [s["config"], str(s["micro_batches"]), str(s["tokens"]), str(s["slots"]), f"{100 * s['pad_fraction']:.1f}%",
            f"{s['attn_slots'] / 1e6:.2f}", f"{s['logprob']:.2f}", f"{s['update']:.2f}", f"{s['train']:.2f}",
            f"{s['speedup']:.2f}x",
            f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    add_size_arguments(parser)
    parser.add_argument("--repeats", type=int, help="timed rounds after one warm-up round")
    parser.add_argument("--budget", type=int, help="optim.max_tokens_per_micro_batch of the budget rows "
                        "(default: micro-batch x (prompt + max-tokens))")
    args = parser.parse_args(argv)
    check_device(parser, args.device, cpu_on_gpu=False)
    cfg = sizes(args, SIZES[args.device], ("repeats", "budget"))
    if cfg["repeats"] < 1 or cfg["n"] < 2 or cfg["prompts"] < 1 or cfg["max_tokens"] < 2:
        parser.error("need --repeats >= 1, --n >= 2 (GRPO groups), --prompts >= 1 and --max-tokens >= 2")
    from megatron_tr1.distributed import single_process_env
    single_process_env()
    rows, info = run_spread(cfg, args.device)
    summary = summarize_spread(rows, info["configs"])
    machine, slug = machine_name(args.device)
    m = info["model"]
    title = (f"GRPO step, padded vs packed micro-batches: {machine}; tiny Qwen2.5-VL scaled (hidden {m['hidden']}, "
             f"{m['layers']} layers, FFN {m['ffn']}, {m['heads']} heads, vocab {m['vocab']}) fp32, world 1, "
             f"{cfg['prompts']} prompts x n={cfg['n']}, prompt {info['prompt_tokens']} tokens, responses "
             f"{info['response_lengths']} tokens; medians of {cfg['repeats']} rounds after 1 warm-up, torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads)")
    notes = ("UNTESTED GPU path. " if args.device == "cuda" else "") + (
        "Each round runs every configuration once (order rotated) on the same sequences: real grpo_steps, the "
        "engine returning a fixed length schedule instead of sampling. slots = token positions computed by the "
        "projections, MLP and logits (tokens + padding); pad_fraction = batch/pad_fraction; attn slots = sum over "
        "micro-batches of sequences x longest^2, what the CPU local spec's attention computes in both layouts "
        f"(a varlen kernel would compute sum L^2 = {summary[0]['attn_varlen'] / 1e6:.2f} M); logprob = reference "
        f"pass ({info['logprob_passes']} log-prob pass: the old policy comes from the update's forward), update = "
        "forward + backward + optimizer; speed vs padded = median padded / median of the row (logprob + update); "
        "per-round ratio = that ratio within each round (median, min-max). Budget rows: "
        "optim.max_tokens_per_micro_batch, first-fit decreasing, under the micro-batch's sequence cap or alone.")
    publish(args.out, "step_packing", slug, title, notes, [(None, SPREAD_HEADER, [spread_cells(s) for s in summary])],
            dict(machine=machine, torch=torch.__version__, config=cfg, notes=notes, info=info, summary=summary,
                 rounds=rows), left=["configuration"],
            md_extra=[f"Parameters: {info['params']}; video patches per step {info['patches_per_step']}; budget "
                      f"{info['budget']} tokens."])



if __name__ == "__main__":
    main()
