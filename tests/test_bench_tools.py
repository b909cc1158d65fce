"""The throughput benchmark tools (tools/bench_decode.py, bench_rollout.py, bench_step.py) run at their smallest
CPU sizes and write JSON + Markdown with the expected rows and positive numbers. Each tool runs as a subprocess
(they initialise torch.distributed and megatron's parallel state, which must not leak into the test process)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(name: str, out: Path, *args: str, torchrun: int = 0, timeout: int = 300) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / name), "--device", "cpu", "--out", str(out), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
               "--master-port", str(_free_port()), *cmd[1:]]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRITON_INTERPRET="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def load(out: Path, stem: str) -> dict:
    assert (out / f"{stem}.md").read_text().startswith("# ")
    return json.loads((out / f"{stem}.json").read_text())


def test_bench_decode(tmp_path):
    run_tool("bench_decode.py", tmp_path, "--durations", "2", "--resolutions", "240p", "--repeats", "1")
    data = load(tmp_path, "decode_cpu")
    assert "toy sizes, CPU" in data["machine"]
    rows = {(r["decoder"], r["codec"]): r for r in data["results"]}
    assert set(rows) == {("pyav", "h264"), ("decord", "h264"), ("dali-cpu", "vp9"), ("pyav", "vp9")}
    must_run = [("pyav", "h264"), ("pyav", "vp9")]
    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
        must_run.append(("dali-cpu", "vp9"))
    for key in must_run:
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["sampled_frames"] == 4  # 2 s at 2 fps
        assert r["frames_per_s"] > 0 and r["rtf"] > 0 and r["wall_s"] > 0
    decord = rows[("decord", "h264")]
    assert decord["status"] == ("ok" if importlib.util.find_spec("decord") else "not installed")


def _check_rollout(data: dict, gen: list[tuple[str, str, int, int]], sync: list[tuple[str, int]], world: int = 2,
                   tp: int = 2) -> None:
    """``gen``: (engine, placement, rollout TP, replicas) of each generation row; ``sync``: (target, ranks)."""
    assert [(r["engine"], r["placement"], r["rollout_tp"], r["replicas"]) for r in data["generation"]] == gen
    for r in data["generation"]:
        assert r["status"] == "ok", r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["world"] == world
        assert r["tokens_per_s_per_rank"] == pytest.approx(r["tokens_per_s"] / world)
        assert r["samples"] == r["prompts"] * r["n"] and r["mean_length"] <= r["max_tokens"]
        assert r["runs_count"] == len(r["runs"]) >= 1 and 0 < r["engine_s"] <= r["wall_s"]
        if any(h["placement"] == "holder" and h["engine"] == r["engine"] for h in data["generation"]):
            assert 0 <= r["same_as_holder"] <= 1  # the same prompts and seeds as the holder row
    assert [r["target"] for r in data["sync"]] == [t for t, ranks in sync for _ in range(ranks)]
    for r in data["sync"]:
        assert r["status"] == "ok" and (r["tp"], r["pp"]) == (tp, 1), r
        assert r["seconds"] > 0
        if r["engine"]:
            assert r["bytes"] > 0 and r["buckets"] >= 1 and r["tensors"] > 0
        else:
            assert r["bytes"] == r["buckets"] == 0


def test_bench_rollout_hf_world2(tmp_path):
    run_tool("bench_rollout.py", tmp_path, "--world", "2", "--engines", "hf", "--prompts", "2", "--n", "2",
             "--max-tokens", "4", "--repeats", "1")
    data = load(tmp_path, "rollout_cpu_world2_hf")  # TP 2 by default at world 2
    _check_rollout(data, [("hf", "holder", 1, 1), ("hf", "every rank", 1, 2)],
                   [("hf holder", 2), ("hf every rank", 2)])
    holder0, holder1, every0, every1 = data["sync"]
    assert holder0["engine"] and not holder1["engine"]  # the old placement: an engine on rank 0 only
    assert every0["engine"] and every1["engine"]
    assert holder0["buckets"] > 1  # 1 MiB buckets of a ~3.7 MB model
    for r in data["sync"]:  # TP 2 into whole-tensor HF engines: every rank all-gathers its TP-split shards
        assert r["collectives"] > 0 and r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["local"] == 0
    assert data["generation"][0]["max_tokens"] == 4 and data["generation"][0]["n"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_bench_rollout_vllm_local_shards(tmp_path):
    """vLLM on every rank at rollout TP 2 = TP: one replica, each rank fed from its own Megatron shard."""
    run_tool("bench_rollout.py", tmp_path, "--world", "2", "--engines", "vllm", "--rollout-tp", "2", "--placements",
             "every-rank", "--prompts", "2", "--n", "2", "--max-tokens", "4", "--repeats", "1")
    data = load(tmp_path, "rollout_cpu_world2_rtp2_vllm_everyrank")
    _check_rollout(data, [("vllm", "every rank", 2, 1)], [("vllm rollout TP 2 (local shards)", 2)])
    for r in data["sync"]:  # nothing crosses between ranks
        assert r["engine"] and r["local"] > 0 and r["collectives"] == r["bytes_sent"] == r["bytes_received"] == 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_bench_rollout_vllm_holder_run(tmp_path):
    """The vLLM holder baseline: one in-process vLLM in a separate single-rank run, reported for the world-2 job."""
    run_tool("bench_rollout.py", tmp_path, "--world", "2", "--engines", "vllm", "--placements", "holder", "--prompts",
             "2", "--n", "2", "--max-tokens", "4", "--repeats", "2", "--trials", "1")
    data = load(tmp_path, "rollout_cpu_world2_vllm_holder")
    _check_rollout(data, [("vllm", "holder", 1, 1)], [])
    row = data["generation"][0]
    assert row["run"] == "separate single-rank run" and row["same_as_holder"] == 1.0 and row["runs_count"] == 2


@pytest.mark.slow
def test_bench_rollout_torchrun(tmp_path):
    """Under torchrun: HF holder + every rank, vLLM at rollout TP 1 (two replicas, gathered sync); the vLLM holder
    needs a single-rank run, which torchrun's ranks do not start."""
    vllm = importlib.util.find_spec("vllm") is not None
    run_tool("bench_rollout.py", tmp_path, "--engines", "hf", "vllm", "--tp", "2", "--rollout-tp", "1", "--prompts",
             "2", "--num-samples", "2", "--max-tokens", "4", "--repeats", "1", torchrun=2)
    data = load(tmp_path, "rollout_cpu_world2_rtp1")
    assert data["launcher"] == "torchrun"
    holder, every = data["generation"][2:]
    assert (holder["engine"], holder["placement"]) == ("vllm", "holder") and holder["status"] != "ok"
    if vllm:
        del data["generation"][2]
        gen = [("hf", "holder", 1, 1), ("hf", "every rank", 1, 2), ("vllm", "every rank", 1, 2)]
        sync = [("hf holder", 2), ("hf every rank", 2), ("vllm rollout TP 1 (gathered)", 2)]
    else:
        assert every["status"] == "vLLM not installed" and data["sync"][-1]["status"] == "vLLM not installed"
        data["generation"], data["sync"] = data["generation"][:2], data["sync"][:-1]
        gen, sync = [("hf", "holder", 1, 1), ("hf", "every rank", 1, 2)], [("hf holder", 2), ("hf every rank", 2)]
    _check_rollout(data, gen, sync)
    for r in data["sync"][-2:]:  # TP 2 into whole-tensor engines: gathered
        assert r["collectives"] > 0 and r["bytes_received"] > 0 and r["local"] == 0


@pytest.mark.slow
def test_bench_step(tmp_path):
    run_tool("bench_step.py", tmp_path, "--prompts", "1", "--n", "2", "--max-tokens", "4", "--steps", "1",
             "--peak-tflops", "1")
    data = load(tmp_path, "step_cpu")
    s = data["summary"]
    for phase in ("rollout", "reward", "logprob", "update", "sync", "step"):
        assert s["seconds"][phase] >= 0
    assert s["seconds"]["step"] > 0 and s["tokens"] > 0 and s["tokens_per_s_per_gpu"] > 0
    assert s["model_tflops"] > 0 and 0 < s["mfu_step"] < s["mfu_train"]
    assert [x["warmup"] for x in data["steps"]] == [True, False]
    assert data["info"]["logprob_passes"] == 1 and data["info"]["params"]["lm_train"] > 0  # reference only: one update


@pytest.mark.slow
def test_bench_packing(tmp_path):
    run_tool("bench_packing.py", tmp_path, "--prompts", "1", "--n", "4", "--max-tokens", "8", "--repeats", "1",
             "--micro-batch", "2", "--layers", "1")
    data = load(tmp_path, "step_packing_cpu")
    rows = {s["config"]: s for s in data["summary"]}
    assert len(rows) == 6 and list(rows)[0].startswith("padded")
    for name, s in rows.items():  # the tool checked its counts against each step's batch/* metrics
        assert (s["pad_fraction"] == 0) == name.startswith("packed") and s["tokens"] > 0 and s["train"] > 0
        assert s["slots"] == pytest.approx(s["tokens"] / (1 - s["pad_fraction"]))
    assert [r["warmup"] for r in data["rounds"]] == [True] * 6 + [False] * 6
