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


def _check_rollout(data: dict, engines: list[str], tp: int = 1, pp: int = 1) -> None:
    assert [r["engine"] for r in data["generation"]] == engines
    for r in data["generation"]:
        assert r["status"] == "ok", r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert r["samples"] == r["prompts"] * r["n"] and r["mean_length"] <= r["max_tokens"]
    assert [r["target"] for r in data["sync"]] == engines
    for r in data["sync"]:
        assert r["status"] == "ok" and (r["tp"], r["pp"]) == (tp, pp)
        assert r["seconds"] > 0 and r["bytes"] > 0 and r["buckets"] >= 1 and r["s_per_gb"] > 0


def test_bench_rollout_hf(tmp_path):
    run_tool("bench_rollout.py", tmp_path, "--engines", "hf", "--prompts", "1", "--n", "2", "--max-tokens", "4",
             "--repeats", "1")
    data = load(tmp_path, "rollout_cpu")
    _check_rollout(data, ["hf"])
    assert data["sync"][0]["buckets"] > 1  # 1 MiB buckets of a ~3.7 MB model
    assert data["generation"][0]["max_tokens"] == 4 and data["generation"][0]["n"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_bench_rollout_vllm(tmp_path):
    run_tool("bench_rollout.py", tmp_path, "--engines", "hf", "vllm", "--prompts", "1", "--n", "2",
             "--max-tokens", "4", "--repeats", "1")
    _check_rollout(load(tmp_path, "rollout_cpu"), ["hf", "vllm"])


@pytest.mark.slow
def test_bench_rollout_tp2_torchrun(tmp_path):
    run_tool("bench_rollout.py", tmp_path, "--engines", "hf", "--tp", "2", "--prompts", "1", "--num-samples", "2",
             "--max-tokens", "4", "--repeats", "1", torchrun=2)
    data = load(tmp_path, "rollout_cpu_tp2pp1")
    _check_rollout(data, ["hf"], tp=2)
    assert data["sync"][0]["collectives"] > 0  # TP all-gathers


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
