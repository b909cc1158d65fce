"""Benchmark the rollout engines (generated tokens/s) and the weight sync from Megatron (seconds per GB).

Rollout: ``--prompts`` video prompts (``rollout.engine.build_prompt`` on random frames), ``--n`` samples each,
``--max-tokens`` new tokens at temperature 1 through ``engine.generate``; generated tokens/s = response tokens /
wall seconds, median of ``--repeats`` after one warm-up call. Lengths are equal unless a sample draws
``<|im_end|>`` (about 1 / vocab per token on random weights); the table shows the mean length and how many stopped
early. Rows: ``HFEngine`` always, ``VLLMEngine`` when vLLM is importable.

Weight sync: ``rollout.weight_sync.sync_weights(model, hf_config, engine, dtype, bucket_bytes)`` from the Megatron
policy at ``--tp`` x ``--pp`` into each engine (held by rank 0): ``SyncStats`` (seconds, bytes, buckets,
collectives) and s/GB (GB = 1e9 bytes in the engine dtype), median of ``--repeats`` after one warm-up sync.
Run TP/PP > 1 with ``torchrun --nproc-per-node <tp*pp> tools/bench_rollout.py --tp 2`` (rank 0 prints and writes).

CPU: toy sizes, the tiny random Qwen2.5-VL (``demo.tiny_hf_model``, fp32; hidden 128, 4 layers, vocab 512).
GPU (UNTESTED: no GPU was available when this was written): a random-weight Qwen2.5-VL-3B config (hidden 2048,
36 layers, 16 heads, 2 KV heads, FFN 11008, vocab 151936, vision depth 32 hidden 1280), bf16, vLLM started with
``load_format="dummy"`` and the HF engine on random weights, the Megatron policy randomly initialised on the GPU;
the tiny tokenizer stands in for Qwen's (its special-token ids are written into the config).

    python tools/bench_rollout.py                          # GPU if there is one, else CPU toy sizes
    python tools/bench_rollout.py --engines hf --max-tokens 16
    torchrun --nproc-per-node 2 tools/bench_rollout.py --tp 2 --num-samples 4

Writes ``benchmarks/rollout_<device>[_tp<T>pp<P>].json`` and ``.md`` and prints the tables.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _bench_io import add_device_argument, check_device, machine_name, publish  # noqa: E402  (tools/ is on sys.path when run as a script)

SIZES = {"cuda": dict(model="qwen2.5-vl-3b", prompts=8, n=8, max_tokens=256, repeats=3, bucket_mb=512,
                      frames=(32, 3, 224, 392), dtype="bfloat16", max_model_len=8192),
         "cpu": dict(model="tiny", prompts=2, n=4, max_tokens=32, repeats=2, bucket_mb=1,
                     frames=(4, 3, 32, 48), dtype="float32", max_model_len=1024)}
QUERIES = ["a person opens the door", "someone sits down on the sofa", "the man turns on the light",
           "a woman puts a cup on the table"]
NOTES = {
    "cuda": "UNTESTED GPU path. Random-weight Qwen2.5-VL-3B shapes, bf16. tokens/s: generated response tokens "
            "per wall second of engine.generate (temperature 1). Sync: sync_weights from the Megatron policy into "
            "the engine held by rank 0; s/GB with GB = 1e9 bytes in the engine dtype.",
    "cpu": "Toy sizes, CPU: tiny random Qwen2.5-VL (hidden 128, 4 layers, vocab 512, vision depth 3), fp32; the "
           "numbers show the paths run, not production speed. tokens/s: generated response tokens per wall second "
           "of engine.generate (temperature 1). Sync: sync_weights from the Megatron policy into the engine held "
           "by rank 0; s/GB with GB = 1e9 bytes in the engine dtype (a few MB moved here, so s/GB is dominated "
           "by per-tensor overhead).",
}


def qwen2_5_vl_3b_config():
    """Qwen2.5-VL-3B-Instruct's shapes (random weights), with the tiny tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    from megatron_tr1.demo import TINY_SPECIAL_TOKENS as T

    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000,
                bos_token_id=T["<|endoftext|>"], eos_token_id=T["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            image_token_id=T["<|image_pad|>"], video_token_id=T["<|video_pad|>"],
                            vision_start_token_id=T["<|vision_start|>"], vision_end_token_id=T["<|vision_end|>"],
                            attn_implementation="sdpa")


def build_models(cfg: dict, backend):
    """(hf_config, tokenizer, Megatron policy of this rank, HF model or None) on ``backend``."""
    from megatron_tr1.demo import build_tiny_tokenizer
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    tokenizer = build_tiny_tokenizer()
    if cfg["model"] == "tiny":
        from megatron_tr1.convert.weights import load_weights
        from megatron_tr1.demo import tiny_hf_model

        hf = tiny_hf_model(0)
        model = Qwen2_5_VLModel(hf.config, layer_spec=backend.layer_spec, cpu_init=not backend.cuda)
        load_weights(model, hf.state_dict(), hf.config)
        return hf.config, tokenizer, model.to(backend.device).eval(), hf
    # GPU, UNTESTED: random init on the GPU, straight into this rank's TP x PP shard
    config = qwen2_5_vl_3b_config()
    model = Qwen2_5_VLModel(config, layer_spec=backend.layer_spec, params_dtype=getattr(torch, cfg["dtype"]))
    return config, tokenizer, model.to(backend.device).eval(), None


def write_model_dir(config, tokenizer_dir: Path, hf=None) -> str:
    """An HF model directory for vLLM: config, tokenizer and processor configs; the weights of ``hf`` if given
    (else none: vLLM starts with ``load_format="dummy"``). For the tiny model the processor configs get its
    4-pixel patches and pixel bounds that leave the tiny frames unresized (as tests/rollout/_cases.py)."""
    from megatron_tr1.demo import build_tiny_tokenizer

    if hf is not None:
        hf.save_pretrained(tokenizer_dir)
    else:
        config.save_pretrained(tokenizer_dir)
    build_tiny_tokenizer(tokenizer_dir)
    if hf is not None:
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            pc = json.loads((tokenizer_dir / name).read_text())
            pc.update(patch_size=config.vision_config.patch_size, min_pixels=64,
                      size={"shortest_edge": 64, "longest_edge": pc["max_pixels"]})
            (tokenizer_dir / name).write_text(json.dumps(pc))
    return str(tokenizer_dir)


def make_engines(names, cfg, config, tokenizer, hf, backend, workdir: Path) -> dict:
    import dataclasses

    from megatron_tr1.rollout.factory import make_engine

    backend = dataclasses.replace(backend, dtype=getattr(torch, cfg["dtype"]))  # the benchmark's engine dtype
    engines = {}
    for name in names:
        start = time.perf_counter()
        if name == "hf":
            engines[name] = make_engine("hf", config, tokenizer, backend)
        else:
            model_dir = write_model_dir(config, workdir / "vllm_model", hf)
            extra = {} if hf is not None else dict(load_format="dummy", gpu_memory_utilization=0.35)
            engines[name] = make_engine("vllm", config, tokenizer, backend, model_dir=model_dir,
                                        max_model_len=cfg["max_model_len"], **extra)  # own process group
        print(f"{name} engine ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return engines


def build_prompts(cfg: dict, config, tokenizer) -> list:
    from megatron_tr1.data.video import VideoFrames
    from megatron_tr1.data.prompt import build_prompt

    prompts = []
    t = cfg["frames"][0]
    for i in range(cfg["prompts"]):
        g = torch.Generator().manual_seed(i)
        frames = torch.randint(0, 256, cfg["frames"], dtype=torch.uint8, generator=g)
        video = VideoFrames(frames=frames, timestamps=torch.arange(t, dtype=torch.float64) / 2.0,
                            indices=torch.arange(t), sample_fps=2.0, duration=t / 2.0, total_frames=t,
                            video_fps=2.0)
        prompts.append(build_prompt(tokenizer, config, QUERIES[i % len(QUERIES)], video))
    return prompts


def bench_generate(engine, prompts, n: int, max_tokens: int, repeats: int, synchronize) -> dict:
    from megatron_tr1.rollout.engine import Sampling

    engine.generate(prompts, n, Sampling(temperature=1.0, max_tokens=max_tokens, seed=1000))  # warm-up
    runs = []
    for r in range(repeats):
        sampling = Sampling(temperature=1.0, max_tokens=max_tokens, seed=r * len(prompts))
        synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, n, sampling)
        synchronize()
        wall = time.perf_counter() - start
        lengths = [len(x.token_ids) for group in out for x in group]
        runs.append(dict(wall_s=wall, tokens=sum(lengths), samples=len(lengths),
                         stopped_early=sum(x.finish_reason == "stop" for group in out for x in group)))
    best = sorted(runs, key=lambda x: x["tokens"] / x["wall_s"])[len(runs) // 2]  # the median run
    return dict(best, tokens_per_s=best["tokens"] / best["wall_s"],
                mean_length=best["tokens"] / best["samples"], prompt_tokens=[len(p.input_ids) for p in prompts],
                runs=runs)


def bench_sync(model, config, engine, dtype, bucket_bytes: int, repeats: int) -> dict:
    """Median sync (every rank calls; only rank 0 has an engine and the byte counts)."""
    from megatron_tr1.rollout.weight_sync import sync_weights

    sync_weights(model, config, engine, dtype=dtype, bucket_bytes=bucket_bytes)  # warm-up
    stats = [sync_weights(model, config, engine, dtype=dtype, bucket_bytes=bucket_bytes) for _ in range(repeats)]
    mid = sorted(stats, key=lambda s: s.seconds)[len(stats) // 2]
    return dict(seconds=mid.seconds, bytes=mid.bytes, buckets=mid.buckets, tensors=mid.tensors,
                peak_bucket_bytes=mid.peak_bucket_bytes, collectives=mid.collectives,
                s_per_gb=mid.seconds / (mid.bytes / 1e9) if mid.bytes else None,
                all_seconds=[s.seconds for s in stats])


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


GEN_HEADER = ["engine", "prompts", "n", "max_tokens", "prompt tokens", "generated", "mean len", "stopped early",
              "wall s", "tokens/s"]
SYNC_HEADER = ["target", "TP", "PP", "dtype", "MB", "tensors", "buckets", "collectives", "seconds", "s/GB"]


def gen_cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["engine"], str(r["prompts"]), str(r["n"]), str(r["max_tokens"])] + ["-"] * 5 + [r["status"]]
    return [r["engine"], str(r["prompts"]), str(r["n"]), str(r["max_tokens"]),
            f"{min(r['prompt_tokens'])}-{max(r['prompt_tokens'])}", str(r["tokens"]), _fmt(r["mean_length"]),
            str(r["stopped_early"]), _fmt(r["wall_s"], ".2f"), _fmt(r["tokens_per_s"])]


def sync_cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["target"], str(r["tp"]), str(r["pp"]), r["dtype"]] + ["-"] * 5 + [r["status"]]
    return [r["target"], str(r["tp"]), str(r["pp"]), r["dtype"], _fmt(r["bytes"] / 1e6, ".2f"), str(r["tensors"]),
            str(r["buckets"]), str(r["collectives"]), _fmt(r["seconds"], ".3f"), _fmt(r["s_per_gb"], ".2f")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"],
                        help="default: hf, plus vllm when it is importable")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--n", "--num-samples", dest="n", type=int,
                        help="samples per prompt (under torchrun spell it --num-samples: its parser takes --n for "
                             "an abbreviation of its own options)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--bucket-mb", type=float, help="sync bucket size in MiB (default: 1 on CPU, 512 on GPU)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    check_device(parser, args.device, cpu_on_gpu=False)
    cfg = dict(SIZES[args.device])
    for key in ("prompts", "n", "max_tokens", "repeats", "bucket_mb"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    vllm_ok = importlib.util.find_spec("vllm") is not None
    names = args.engines or (["hf", "vllm"] if vllm_ok else ["hf"])
    cfg.update(engines=names, tp=args.tp, pp=args.pp)

    import torch.distributed as dist

    from megatron_tr1.distributed import init_parallel, single_process_env

    single_process_env()
    backend = init_parallel(args.tp, args.pp)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, cfg["dtype"])
    config, tokenizer, model, hf = build_models(cfg, backend)

    threads = torch.get_num_threads()  # vLLM's CPU worker lowers it to 1 "for serving"; each engine gets this many
    gen_rows, sync_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        engines = {}
        if rank == 0:
            for name in names:
                if name == "vllm" and not vllm_ok:
                    continue
                engines |= make_engines([name], cfg, config, tokenizer, hf, backend, Path(tmp))
        bucket_bytes = int(cfg["bucket_mb"] * 2 ** 20)
        for name in names:  # every rank takes part in every sync, in the same order
            row = dict(target=name, tp=args.tp, pp=args.pp, dtype=cfg["dtype"], bucket_bytes=bucket_bytes,
                       status="ok")
            if name == "vllm" and not vllm_ok:
                sync_rows.append(row | dict(status="vLLM not installed"))
                continue
            row |= bench_sync(model, config, engines.get(name), dtype, bucket_bytes, cfg["repeats"])
            sync_rows.append(row)
            if rank == 0:
                print(f"sync -> {name}: {row['seconds']:.3f} s, {row['bytes'] / 1e6:.2f} MB", file=sys.stderr)
        if rank == 0:
            prompts = build_prompts(cfg, config, tokenizer)
            for name in names:
                row = dict(engine=name, prompts=cfg["prompts"], n=cfg["n"], max_tokens=cfg["max_tokens"],
                           status="ok")
                if name not in engines:
                    gen_rows.append(row | dict(status="vLLM not installed"))
                    continue
                torch.set_num_threads(threads)
                row |= bench_generate(engines[name], prompts, cfg["n"], cfg["max_tokens"], cfg["repeats"],
                                      backend.synchronize)
                row["threads"] = torch.get_num_threads()
                gen_rows.append(row)
                print(f"generate {name}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
            if "vllm" in engines:
                engines["vllm"].close()
        dist.barrier()
    if rank != 0:
        return

    machine, slug = machine_name(args.device)
    if args.tp * args.pp > 1:
        slug += f"_tp{args.tp}pp{args.pp}"
    versions = {"torch": torch.__version__, "threads": threads}
    if vllm_ok:
        import vllm
        versions["vllm"] = vllm.__version__
    title = (f"rollout: {machine}; model {cfg['model']} {cfg['dtype']}, world {world} (TP={args.tp} PP={args.pp}), "
             + ", ".join(f"{k} {v}" for k, v in versions.items()))
    after = f"median of {cfg['repeats']} after a warm-up"
    publish(args.out, "rollout", slug, title, NOTES[args.device],
            [(f"Generation ({after})", GEN_HEADER, [gen_cells(r) for r in gen_rows]),
             (f"Weight sync ({after}; bucket {cfg['bucket_mb']} MiB)", SYNC_HEADER, [sync_cells(r) for r in sync_rows])],
            dict(machine=machine, versions=versions, config=cfg, notes=NOTES[args.device], generation=gen_rows,
                 sync=sync_rows), left=("engine", "target", "dtype"))

if __name__ == "__main__":
    main()
