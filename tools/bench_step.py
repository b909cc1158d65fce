"""Benchmark one GRPO step (``rl.grpo.grpo_step``): seconds per phase, tokens/s/GPU and MFU.

The step is built as tests/rl/_step_cases.py::grpo_case builds it: ``distributed.init_parallel``, the tiny random
Qwen2.5-VL (``demo.tiny_hf_model``) as HF model and Megatron policy + frozen reference, an ``HFEngine`` given the
policy's weights with ``sync_weights``, megatron DDP + DistributedOptimizer (``wrap_ddp_and_optimizer``),
synthetic grounding videos (``data.synthetic.generate``) turned into prompts by ``rl.prompts.grounding_prompt``,
and a length-based reward (a random model's responses all score 0 with the real one, which leaves no spread).
One warm-up step, then ``--steps`` timed steps; the table shows medians of grpo_step's own ``time/<phase>``
metrics (rollout, reward, logprob = old + reference log-probs, update, sync) and ``tokens_per_s``.

MFU = model FLOPs / step seconds / peak FLOP/s, with model FLOPs per step (attention score FLOPs left out):

    F = 6 * (N_lm * T + N_vis * P) + 2 * (N_lm * T + N_vis * P) * passes
    N_lm  = language-model + patch-merger parameters without the input embedding table (a lookup; a tied table
            still counts once, as the LM head's matmul), applied to every trained token;
    N_vis = vision-encoder parameters (patch embedding + blocks), applied to every video patch;
    T = tokens of the step's sequences (prompt incl. visual tokens + response), P = their video patches;
    passes = forward-only log-prob passes: old policy (none when the step makes one update: ``grpo.old_from_update``)
             + reference (none when kl_coef = 0).

The trained (6x) term counts trainable parameters only; the forward-only terms count all. Rollout FLOPs are not
counted. ``MFU train`` divides the same FLOPs by the logprob + update seconds only. The peak is ``--peak-tflops``
(default 989 = H100 SXM dense bf16 on GPU); on CPU there is no meaningful peak and MFU is n/a unless given.

CPU: toy sizes (the tiny model in fp32, 2 prompts x n=4, 16 new tokens). GPU: UNTESTED (no GPU was available
when this was written); it moves the same tiny model to the GPU.

    python tools/bench_step.py                         # GPU if there is one, else CPU toy sizes
    python tools/bench_step.py --steps 3 --n 4 --max-tokens 32 --peak-tflops 1.5

Writes ``benchmarks/step_<device>.json`` and ``.md`` and prints the table. ``--spread`` runs
``tools/bench_packing.py`` (padded vs packed micro-batches at a Temporal-R1-like length spread) instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _bench_io import add_device_argument, check_device, machine_name, publish  # noqa: E402  (tools/ is on sys.path when run as a script)

SIZES = {"cuda": dict(prompts=8, n=8, max_tokens=64, steps=3, micro_batch=8, peak_tflops=989.0, hidden=128, layers=4),
         "cpu": dict(prompts=2, n=4, max_tokens=16, steps=2, micro_batch=4, peak_tflops=None, hidden=128, layers=4)}
PHASES = ("rollout", "reward", "logprob", "update", "sync", "step")
NOTES = {
    "cuda": "UNTESTED GPU path (tiny model moved to the GPU). ",
    "cpu": "Toy sizes, CPU: tiny random Qwen2.5-VL (hidden {hidden}, {layers} layers, vocab 512, vision depth 3), fp32, "
           "HF rollout engine; the numbers show the step runs, not production speed. MFU is n/a without "
           "--peak-tflops (no meaningful CPU peak). ",
}
FORMULA = ("MFU = F / seconds / peak, F = 6 * (N_lm * T + N_vis * P) (trainable params) + 2 * (N_lm * T + N_vis * "
           "P) * passes (all params), N_lm = LM + merger params without the input embedding table, N_vis = vision "
           "encoder params, T = trained tokens (prompt incl. visual + response), P = video patches, passes = old "
           "policy (none with one update per step) + reference log-prob passes; attention score FLOPs and rollout "
           "FLOPs not counted. MFU step divides by time/step, MFU train by time/logprob + time/update.")


def length_reward(response, gt, duration, format_weight=0.5):
    """A reward with spread for a random model (the real one is 0 for every random response)."""
    score = len(response) / 100.0
    return {"overall": score, "format": 0.0, "accuracy": score}


def param_counts(model, tied: bool) -> dict[str, int]:
    """Parameters by role (see the module docstring): lm/vis, all and trainable."""
    out = dict(lm=0, vis=0, lm_train=0, vis_train=0, embedding=0)
    for name, p in model.named_parameters():
        if name.endswith("embedding.word_embeddings.weight"):
            out["embedding"] += p.numel()
            if not tied:
                continue
        kind = "vis" if name.startswith("vision.") and not name.startswith("vision.merger.") else "lm"
        out[kind] += p.numel()
        if p.requires_grad:
            out[f"{kind}_train"] += p.numel()
    return out


def step_flops(counts: dict, tokens: float, patches: float, passes: int) -> float:
    train = 6 * (counts["lm_train"] * tokens + counts["vis_train"] * patches)
    forward = 2 * (counts["lm"] * tokens + counts["vis"] * patches) * passes
    return train + forward


def model_kwargs(hidden: int, layers: int) -> dict:
    """``tiny_hf_model`` arguments of the tiny model scaled to ``hidden`` and ``layers``: 4 heads, 2 query groups,
    FFN 2 x hidden and M-RoPE sections in Qwen2.5-VL's 1/4, 3/8, 3/8 ratio, as the demo's (hidden 128 is the demo's
    own model)."""
    if hidden == 128:
        return dict(num_hidden_layers=layers)
    if hidden % 16:
        raise ValueError(f"hidden {hidden}: must be a multiple of 16 (4 heads of an even size, M-RoPE sections)")
    half = hidden // 4 // 2
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections})


def train_config(cfg: dict, batch: int, micro_batch: int, packing: bool = True, budget: int = 0,
                 max_prompt_tokens: int = 512):
    from megatron_tr1.rl.config import DataSection, OptimConfig, RolloutConfig, TrainConfig, VideoBudget

    train = TrainConfig(
        rollout=RolloutConfig(n=cfg["n"], prompts_per_step=cfg["prompts"], max_tokens=cfg["max_tokens"],
                              temperature=1.0),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, micro_batch_size=min(micro_batch, batch),
                          global_batch_size=batch, packing=packing, max_tokens_per_micro_batch=budget,
                          packing_min_saving=0.0),
        data=DataSection(video=VideoBudget(max_frames=4), max_prompt_tokens=max_prompt_tokens))
    train.algorithm.dynamic_sampling = False
    return train


def build(cfg: dict, device: str, engine_cls=None) -> dict:
    """The step's pieces (see the module docstring): policy, optimizer, engine, reference, prompts, config."""
    from megatron_tr1.data import synthetic
    from megatron_tr1.data.dataset import load_data_config, load_samples
    from megatron_tr1.distributed import init_parallel, wrap_ddp_and_optimizer
    from megatron_tr1.rl.grpo import old_from_update
    from megatron_tr1.rl.prompts import grounding_prompt
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    batch = cfg["prompts"] * cfg["n"]
    train = train_config(cfg, batch, cfg["micro_batch"])
    backend = init_parallel(1, 1)
    hf = tiny_hf_model(0, **model_kwargs(cfg["hidden"], cfg["layers"]))
    tokenizer = build_tiny_tokenizer()
    with tempfile.TemporaryDirectory(prefix="bench_step_") as folder:
        synthetic.generate(folder, cfg["prompts"], num_test=0, num_ood=0, size=56, progress=False)
        samples = load_samples(load_data_config(f"{folder}/train.yaml")).samples
        items = [grounding_prompt(s, train, tokenizer, hf.config) for s in samples]
    model, ref = (Qwen2_5_VLModel(hf.config, layer_spec=backend.layer_spec, cpu_init=not backend.cuda)
                  for _ in range(2))
    for m in (model, ref):
        load_weights(m, hf.state_dict(), hf.config)
    model, ref = model.to(backend.device).train(), ref.to(backend.device).eval()  # GPU: UNTESTED
    engine = (engine_cls or HFEngine)(hf.config, tokenizer, device=str(backend.device))
    sync_weights(model, hf.config, engine, dtype=engine.dtype)
    (policy,), optimizer = wrap_ddp_and_optimizer([model], train.optim.lr, 0.0, train.optim.grad_clip)
    counts = param_counts(model, hf.config.tie_word_embeddings)
    patches_per_seq = [int(i.prompt.video.video_grid_thw.prod()) for i in items]
    passes = int(not old_from_update(batch, train)) + int(train.algorithm.kl_coef > 0)
    return dict(policy=policy, optimizer=optimizer, engine=engine, ref=ref, items=items, train=train,
                tokenizer=tokenizer, hf=hf, backend=backend, batch=batch, counts=counts,
                patches=sum(patches_per_seq) * cfg["n"], passes=passes)


def run(cfg: dict, device: str) -> tuple[list[dict], dict]:
    from megatron_tr1.rl.grpo import grpo_step

    b = build(cfg, device)
    steps = []
    for step in range(cfg["steps"] + 1):  # step 0: warm-up
        metrics = grpo_step(b["policy"], b["optimizer"], b["engine"], b["ref"], b["items"], b["train"],
                            b["tokenizer"], b["hf"].config, step=step, reward_fn=length_reward,
                            sync=b["backend"].sync)
        tokens = metrics["tokens_per_s"] * metrics["time/step"]
        flops = step_flops(b["counts"], tokens, b["patches"], b["passes"])
        row = {p: metrics[f"time/{p}"] for p in PHASES} | dict(
            index=step, warmup=step == 0, tokens=round(tokens), tokens_per_s=metrics["tokens_per_s"],
            flops=flops, reward_std=metrics.get("reward/std"), loss=metrics.get("loss"))
        steps.append(row)
        print(f"step {step}: {metrics['time/step']:.2f} s, {metrics['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    info = dict(params=b["counts"], patches_per_step=b["patches"], logprob_passes=b["passes"],
                prompt_tokens=[len(i.prompt.input_ids) for i in b["items"]], world_size=1)
    return steps, info


def summarize(steps: list[dict], peak_tflops: float | None, gpus: int) -> dict:
    timed = [s for s in steps if not s["warmup"]]
    med = {p: statistics.median(s[p] for s in timed) for p in PHASES}
    tokens = statistics.median(s["tokens"] for s in timed)
    flops = statistics.median(s["flops"] for s in timed)
    out = dict(seconds=med, tokens=tokens, tokens_per_s_per_gpu=statistics.median(s["tokens_per_s"] for s in timed)
               / gpus, model_tflops=flops / 1e12, achieved_tflops_step=flops / med["step"] / 1e12 / gpus,
               mfu_step=None, mfu_train=None)
    if peak_tflops:
        out["mfu_step"] = flops / med["step"] / gpus / (peak_tflops * 1e12)
        out["mfu_train"] = flops / (med["logprob"] + med["update"]) / gpus / (peak_tflops * 1e12)
    return out


HEADER = ["prompts x n", "max_tokens", "tokens/step", "rollout s", "reward s", "logprob s", "update s", "sync s",
          "step s", "tokens/s/GPU", "TFLOP/step", "MFU step", "MFU train"]


def table_cells(cfg: dict, s: dict) -> list[str]:
    sec = s["seconds"]
    pct = (lambda x: "n/a" if x is None else f"{100 * x:.2g}%")
    return [f"{cfg['prompts']} x {cfg['n']}", str(cfg["max_tokens"]), f"{s['tokens']:.0f}"] + \
        [f"{sec[p]:.3f}" for p in PHASES] + [f"{s['tokens_per_s_per_gpu']:.1f}", f"{s['model_tflops']:.3g}",
                                              pct(s["mfu_step"]), pct(s["mfu_train"])]


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes ``bench_step`` and ``bench_packing`` share (each defaults them per device)."""
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--n", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--micro-batch", type=int, help="optim.micro_batch_size (the sequence cap with a budget)")
    parser.add_argument("--hidden", type=int, help="LM hidden size of the scaled tiny model (FFN 2x, 4 heads)")
    parser.add_argument("--layers", type=int, help="decoder layers of the tiny model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")


def sizes(args, defaults: dict, keys: tuple[str, ...]) -> dict:
    cfg = dict(defaults)
    for key in ("prompts", "n", "max_tokens", "micro_batch", "hidden", "layers", *keys):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--spread" in argv:  # padded vs packed at a length spread: tools/bench_packing.py
        import bench_packing
        return bench_packing.main([a for a in argv if a != "--spread"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    add_size_arguments(parser)
    parser.add_argument("--steps", type=int, help="timed steps after one warm-up")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device in TFLOP/s (default: 989 on GPU, "
                        "none on CPU)")
    args = parser.parse_args(argv)
    check_device(parser, args.device, cpu_on_gpu=False)
    cfg = sizes(args, SIZES[args.device], ("steps", "peak_tflops"))
    if cfg["steps"] < 1 or cfg["n"] < 2 or cfg["prompts"] < 1:
        parser.error("need --steps >= 1, --n >= 2 (GRPO groups) and --prompts >= 1")
    from megatron_tr1.distributed import single_process_env
    single_process_env()
    steps, info = run(cfg, args.device)
    summary = summarize(steps, cfg["peak_tflops"], info["world_size"])
    machine, slug = machine_name(args.device)
    title = (f"GRPO step: {machine}; tiny Qwen2.5-VL fp32, HF engine, world 1, median of {cfg['steps']} steps after "
             f"1 warm-up, peak {cfg['peak_tflops'] or 'n/a'} TFLOP/s, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads)")
    notes = NOTES[args.device].format(**cfg) + FORMULA
    cells = table_cells(cfg, summary)
    publish(args.out, "step", slug, title, notes, [(None, HEADER, [cells])],
            dict(machine=machine, torch=torch.__version__, config=cfg, notes=notes, info=info, summary=summary,
                 steps=steps),
            md_extra=[f"Parameters: {info['params']}; video patches per step {info['patches_per_step']}; log-prob "
                      f"passes {info['logprob_passes']}; prompt tokens {info['prompt_tokens']}."])


if __name__ == "__main__":
    main()
