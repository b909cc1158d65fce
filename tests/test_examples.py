"""The example configs, recipes and SLURM scripts: train configs load and fit the GPU counts their recipes
request, the 7B/72B layouts are what the memory planner recommends and fit in memory, every shell script parses,
and train.sbatch / eval.sbatch / eval.sh behave as documented under stub ``srun``/``scontrol``/``torchrun``/``tr1``
commands (forwarding SIGUSR1, requeueing only unfinished runs, exporting the newest complete checkpoint)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tr1.errors import ConfigError
from megatron_tr1.plan.layouts import Layout, enumerate_layouts, recommend
from megatron_tr1.plan.memory import GiB, Workload, layout_peak, stage_breakdowns
from megatron_tr1.plan.models import BUILTIN
from megatron_tr1.rl.config import check_layout, load_train_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SLURM = EXAMPLES / "slurm"
TRAIN_SBATCH = SLURM / "train.sbatch"
GPUS_PER_NODE = 8
TRAIN_YAMLS = sorted(EXAMPLES.glob("*.yaml"))
SHELL_SCRIPTS = sorted([*EXAMPLES.rglob("*.sh"), *EXAMPLES.rglob("*.sbatch")])
SCALED = {"qwen2_5_vl_7b": "qwen2.5-vl-7b", "qwen2_5_vl_72b": "qwen2.5-vl-72b",  # recipes whose layout comes
          "qwen3_vl_8b": "qwen3-vl-8b"}  # from `tr1 plan`
# Fields the 7B/72B configs may change relative to the 3B Temporal-R1 config: the model, the layout and
# what the layout needs; every training setting stays the 3B one.
MAY_DIFFER = {"run_dir", "model.hf_dir", "model.tensor_parallel", "model.pipeline_parallel", "model.recompute",
              "optim.micro_batch_size", "optim.max_tokens_per_micro_batch", "rollout.gpu_memory_utilization",
              "checkpoint.every", "rollout.tensor_parallel"}


def recipe_nodes(yaml_path: Path) -> int | None:
    """``NODES`` default of the recipe next to a train config (None when it has no recipe)."""
    sh = yaml_path.with_suffix(".sh")
    if not sh.is_file():
        return None
    m = re.search(r"^NODES=\$\{NODES:-(\d+)\}", sh.read_text(), re.M)
    assert m, f"{sh.name}: no NODES=${{NODES:-N}} line"
    return int(m.group(1))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def workload(cfg) -> Workload:
    """The planner's description of a train config's step: tokens per micro-batch, visual tokens, recompute,
    the vLLM share."""
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    o = cfg.optim
    micro = min(o.micro_batch_size, o.max_tokens_per_micro_batch // seq) if o.max_tokens_per_micro_batch else \
        o.micro_batch_size
    return Workload(seq_len=seq, micro_batch=micro, visual_tokens=cfg.data.video.total_pixels // (28 * 28),
                    recompute=cfg.model.recompute == "full", vllm_fraction=cfg.rollout.gpu_memory_utilization,
                    gpu_mem_gib=80.0)


# ---------------------------------------------------------------- train configs

def test_examples_exist():
    names = {p.name for p in TRAIN_YAMLS}
    assert {"qwen2_5_vl_3b_charades.yaml", "qwen2_5_vl_7b_charades.yaml", "qwen2_5_vl_72b_charades.yaml"} <= names
    for stem in ("qwen2_5_vl_3b", *SCALED):
        assert (EXAMPLES / f"{stem}_charades.sh").is_file() and (EXAMPLES / f"{stem}_charades.yaml").is_file()
    assert TRAIN_SBATCH.is_file() and (SLURM / "eval.sbatch").is_file() and (EXAMPLES / "eval.sh").is_file()


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.name)
def test_train_config_loads_and_fits_its_gpu_count(path):
    cfg = load_train_config(path)  # unknown keys and bad values raise ConfigError naming the field
    nodes = recipe_nodes(path)
    if nodes is None:  # no SLURM recipe: a single-process config (the CPU demo)
        assert cfg.model.tensor_parallel * cfg.model.pipeline_parallel == 1
        check_layout(cfg, 1)
        return
    world = nodes * GPUS_PER_NODE
    dp = check_layout(cfg, world)
    assert dp * cfg.model.tensor_parallel * cfg.model.pipeline_parallel == world
    for name in ("train", "test", "ood"):
        assert Path(getattr(cfg.data, name)).is_file(), f"{path.name}: data.{name} does not exist"
    assert cfg.model.hf_dir and cfg.rollout.engine == "vllm" and cfg.model.dtype == "bf16"


@pytest.mark.parametrize("size", SCALED)
def test_scaled_configs_keep_the_3b_training_settings(size):
    import yaml

    base = flatten(yaml.safe_load((EXAMPLES / "qwen2_5_vl_3b_charades.yaml").read_text()))
    scaled = flatten(yaml.safe_load((EXAMPLES / f"{size}_charades.yaml").read_text()))
    assert set(base) - MAY_DIFFER <= set(scaled)
    changed = {k for k in set(base) | set(scaled) if base.get(k) != scaled.get(k)}
    assert changed <= MAY_DIFFER, f"{size}: changed beyond the layout: {sorted(changed - MAY_DIFFER)}"
    family, params = size.rsplit("_", 1)
    assert f"{ {'qwen2_5_vl': 'Qwen2.5-VL', 'qwen3_vl': 'Qwen3-VL'}[family]}-{params.upper()}-Instruct" in \
        scaled["model.hf_dir"]


@pytest.mark.parametrize("size, model", SCALED.items())
def test_scaled_layout_is_the_planner_recommendation_and_fits(size, model):
    path = EXAMPLES / f"{size}_charades.yaml"
    cfg = load_train_config(path)
    nodes = recipe_nodes(path)
    world = nodes * GPUS_PER_NODE
    tp, pp = cfg.model.tensor_parallel, cfg.model.pipeline_parallel
    assert world % (tp * pp) == 0
    dp = world // (tp * pp)
    spec, w = BUILTIN[model], workload(cfg)

    peak = layout_peak(stage_breakdowns(spec, w, tp, pp, dp))
    assert peak <= w.usable_bytes < 80 * GiB  # under 80 GB with the planner's 10% headroom to spare

    layouts, _ = enumerate_layouts(spec, GPUS_PER_NODE, nodes)
    rows = [(layout, stage_breakdowns(spec, w, layout.tp, layout.pp, layout.dp)) for layout in layouts]
    assert recommend(rows, w.usable_bytes) == Layout(tp, pp, dp)

    # the plan command and its output quoted at the top of the YAML match what the planner says today
    text = path.read_text()
    command = re.search(r"^#\s+(tr1 plan .*)$", text, re.M).group(1)
    assert f"--model {model}" in command and f"--nodes {nodes}" in command and "--gpu-mem 80" in command
    assert ("--recompute" in command) == w.recompute
    line = re.search(r"recommended: TP=(\d+) PP=(\d+) DP=(\d+) \(peak ([\d.]+) GiB", text)
    assert tuple(map(int, line.groups()[:3])) == (tp, pp, dp)
    assert float(line.group(4)) == pytest.approx(peak / GiB, abs=0.05)
    assert f"{nodes} node" in text.split("run_dir:")[0]


def test_72b_needs_recompute_and_a_smaller_vllm_share():
    path = EXAMPLES / "qwen2_5_vl_72b_charades.yaml"
    cfg = load_train_config(path)
    assert cfg.model.recompute == "full" and cfg.rollout.gpu_memory_utilization == 0.35
    # with the defaults nothing fits on the recipe's nodes: the planner's reason for both settings
    spec = BUILTIN["qwen2.5-vl-72b"]
    tp, pp = cfg.model.tensor_parallel, cfg.model.pipeline_parallel
    dp = recipe_nodes(path) * GPUS_PER_NODE // (tp * pp)
    w = Workload(seq_len=6144, micro_batch=1, recompute=False, vllm_fraction=0.5)
    peak = layout_peak(stage_breakdowns(spec, w, tp, pp, dp))
    assert peak > w.usable_bytes


def test_layout_mismatch_is_caught():
    cfg = load_train_config(EXAMPLES / "qwen2_5_vl_72b_charades.yaml")
    with pytest.raises(ConfigError, match="not divisible"):
        check_layout(cfg, 8)  # TP 4 x PP 8 does not fit one node


# ---------------------------------------------------------------- shell scripts

@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_shell_script_parses(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert path.read_text().startswith("#!/bin/bash\n")


def test_train_sbatch_directives():
    text = TRAIN_SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=(B:)?USR1@\d+", d) for d in directives)
    assert "--output=logs/%x-%j.out" in directives and "--ntasks-per-node=1" in directives
    assert "--resume auto" in text and "scontrol requeue" in text and "trap " in text
    assert re.search(r"--rdzv-backend c10d --rdzv-endpoint", text)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in text and "OMP_NUM_THREADS" in text


@pytest.mark.parametrize("size", ["qwen2_5_vl_3b", *SCALED])
def test_recipe_submits_its_config_and_nodes(size):
    text = (EXAMPLES / f"{size}_charades.sh").read_text()
    assert f"CONFIG=examples/{size}_charades.yaml" in text
    assert re.search(r'sbatch .*--nodes "\$NODES".*\n.*examples/slurm/train\.sbatch', text)
    assert re.search(r'--dependency "afterok:\$TRAIN_JOB"\s*\\\n.*examples/slurm/eval\.sbatch', text)
    assert "tr1 convert mcore-to-hf" in text


# ---------------------------------------------------------------- train.sbatch under stub SLURM commands

STUB_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo node-a; echo node-b; exit 0; fi
echo "scontrol $*" >> "$STUB_LOG"
"""
STUB_SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
while [[ $# -gt 0 && "$1" != bash ]]; do shift; done
export SLURM_NODEID=0
"$@" &
child=$!
trap 'kill -USR1 $child' USR1
trap 'kill -TERM $child' TERM
rc=0
while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
exit $rc
"""
STUB_TORCHRUN = """#!{python}
import os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("torchrun " + " ".join(args) + "\\n")
run_dir = Path(args[args.index("--run-dir") + 1])
mode = os.environ["STUB_MODE"]
if mode == "done":
    (run_dir / "DONE").touch()
    sys.exit(0)
if mode == "exit0":  # saved and stopped on its own, no DONE
    sys.exit(0)
if mode == "crash":
    sys.exit(3)
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
Path(os.environ["STUB_READY"]).touch()
for _ in range(400):
    if got:
        with open(os.environ["STUB_LOG"], "a") as log:
            log.write("torchrun got SIGUSR1\\n")
        sys.exit(1)  # torchrun exits non-zero after a handled signal even when the ranks exit 0
    time.sleep(0.025)
sys.exit(9)
"""


@pytest.fixture
def stub_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", STUB_SCONTROL), ("srun", STUB_SRUN),
                       ("torchrun", STUB_TORCHRUN.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_READY": str(tmp_path / "ready"), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_ON_NODE": "32", "RUN_DIR": str(tmp_path / "run"),
           "CONFIG": str(EXAMPLES / "qwen2_5_vl_7b_charades.yaml"), "PREFLIGHT": "0"}
    for key in ("OVERRIDES", "MASTER_PORT", "SLURM_RESTART_COUNT", "OMP_NUM_THREADS"):
        env.pop(key, None)
    return env, log


def run_sbatch(env, *args, mode, **extra):
    return subprocess.run(["bash", str(TRAIN_SBATCH), *args], env={**env, "STUB_MODE": mode, **extra},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("mode, requeued, rc", [("done", False, 0), ("exit0", True, 0), ("crash", False, 3)])
def test_train_sbatch_requeues_only_unfinished_runs(stub_slurm, mode, requeued, rc):
    env, log = stub_slurm
    r = run_sbatch(env, "model.tensor_parallel=4", "--stages", "grpo", mode=mode)
    assert r.returncode == rc, r.stdout + r.stderr
    calls = log.read_text()
    assert ("scontrol requeue 4242" in calls) == requeued
    torchrun = next(line for line in calls.splitlines() if line.startswith("torchrun "))
    assert "--nnodes 2 --nproc-per-node 8" in torchrun
    assert "--rdzv-backend c10d --rdzv-endpoint node-a:24242" in torchrun  # first host, port from the job id
    assert "SIGUSR1" in torchrun and f"--log-dir {env['RUN_DIR']}/logs/4242/node0" in torchrun
    assert torchrun.endswith(f"-m megatron_tr1.cli train --config {env['CONFIG']} --run-dir {env['RUN_DIR']} "
                             "--resume auto model.tensor_parallel=4 --stages grpo")
    assert (Path(env["RUN_DIR"]) / "logs" / "4242" / "job.txt").is_file()


def test_train_sbatch_forwards_usr1_and_requeues(stub_slurm, tmp_path):
    env, log = stub_slurm
    proc = subprocess.Popen(["bash", str(TRAIN_SBATCH)], env={**env, "STUB_MODE": "signal"}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    calls = log.read_text()
    assert "torchrun got SIGUSR1" in calls and "scontrol requeue 4242" in calls
    assert "requeueing job 4242" in out


def test_train_sbatch_done_run_is_not_relaunched(stub_slurm):
    env, log = stub_slurm
    Path(env["RUN_DIR"]).mkdir()
    (Path(env["RUN_DIR"]) / "DONE").touch()
    r = run_sbatch(env, mode="crash")
    assert r.returncode == 0 and not log.exists()  # neither srun nor scontrol ran


def test_train_sbatch_preflight_rejects_a_bad_layout(stub_slurm):
    env, log = stub_slurm
    r = run_sbatch(env, "model.tensor_parallel=3", mode="done", PREFLIGHT="1")
    assert r.returncode == 2 and "preflight" in r.stderr and "tensor_parallel" in r.stderr
    assert not log.exists()  # nothing launched
    r = run_sbatch(env, "model.pipeline_parallel=2", mode="done", PREFLIGHT="1")  # TP 4 x PP 2 x DP 2 = 16
    assert r.returncode == 0, r.stderr
    assert "TP=4 PP=2 DP=2" in r.stdout


# ---------------------------------------------------------------- eval.sbatch and eval.sh under a stub tr1

STUB_TR1 = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("tr1 " + " ".join(args) + "\\n")
if args[0] == "convert":
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    (out / "config.json").write_text("{{}}")
elif args[0] == "eval":
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    m = {{"n": 2, "mIoU": 50.0 if "--no-think" in args else 60.0, "R@0.3": 1.0, "R@0.5": 0.5, "R@0.7": 0.25}}
    (out / "metrics.json").write_text(json.dumps({{"metrics": {{"charades": m, "all": m}}}}))
"""


@pytest.fixture
def stub_tr1(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tr1").write_text(STUB_TR1.format(python=sys.executable))
    (bin_dir / "tr1").chmod(0o755)
    log = tmp_path / "stub.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "SLURM_SUBMIT_DIR": str(ROOT)}
    for key in ("DATASETS", "MODES", "PARSER", "ENGINE", "MAX_TOKENS", "TRAIN_CONFIG", "EVAL_ARGS", "MODEL_DIR",
                "CKPT_DIR", "STAGES", "REQUIRE_DONE", "SKIP_EVAL", "OUT"):
        env.pop(key, None)
    return env, log


def make_run(run: Path, done: bool) -> None:
    """A finished grpo stage (final weights + its config.yaml) and an unfinished grpo_no_think stage with two
    complete checkpoints and an interrupted save."""
    final = run / "stages" / "grpo" / "model"
    final.mkdir(parents=True)
    (final / "tr1_mcore.json").write_text("{}")
    (final.parent / "config.yaml").write_text("seed: 0\n")
    for step, complete in ((10, True), (20, True), (30, False)):  # step 30: an interrupted save
        model = run / "checkpoints" / "grpo_no_think" / f"step_{step:06d}" / "model"
        model.mkdir(parents=True)
        (model / "tr1_mcore.json").write_text("{}")
        if complete:
            (model.parent / "COMPLETE").touch()
    if done:
        (run / "DONE").touch()


def run_eval_sbatch(env, **extra):
    return subprocess.run(["bash", str(SLURM / "eval.sbatch")], env={**env, **extra}, capture_output=True,
                          text=True, timeout=60)


def test_eval_sbatch_exports_each_stage_and_evaluates(stub_tr1, tmp_path):
    env, log = stub_tr1
    run = tmp_path / "run"
    make_run(run, done=False)
    r = run_eval_sbatch(env, RUN_DIR=str(run))
    assert r.returncode == 1 and "DONE" in r.stderr and not log.exists()  # training not finished
    (run / "DONE").touch()
    r = run_eval_sbatch(env, RUN_DIR=str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    hf = run / "hf" / "grpo"
    assert calls[0] == f"tr1 convert mcore-to-hf --mcore-dir {run}/stages/grpo/model --out {hf} --force --no-progress"
    assert not any("grpo_no_think" in c for c in calls)  # no final weights: not exported when DONE is required
    evals = [c for c in calls if c.startswith("tr1 eval")]
    assert len(evals) == 4 and sum("--no-think" in c for c in evals) == 2
    assert all(f"--model {hf} " in c and f"--train-config {run}/stages/grpo/config.yaml" in c for c in evals)
    for data in ("charades_sta_test", "activitynet_val"):
        assert any(f"--data {EXAMPLES}/data/{data}.yaml" in c for c in evals)
        assert (run / "eval" / "grpo" / f"{data}-no-think" / "metrics.json").is_file()
    assert "| charades_sta_test-think | charades | 2 | 60.00 |" in r.stdout
    assert "| activitynet_val-no-think | charades | 2 | 50.00 |" in r.stdout


def test_eval_sbatch_unfinished_run_exports_the_newest_complete_checkpoint(stub_tr1, tmp_path):
    env, log = stub_tr1
    run = tmp_path / "run"
    make_run(run, done=False)
    r = run_eval_sbatch(env, RUN_DIR=str(run), REQUIRE_DONE="0", SKIP_EVAL="1", STAGES="grpo_no_think")
    assert r.returncode == 0, r.stdout + r.stderr
    assert log.read_text().splitlines() == [
        f"tr1 convert mcore-to-hf --mcore-dir {run}/checkpoints/grpo_no_think/step_000020/model "
        f"--out {run}/hf/grpo_no_think-step_000020 --force --no-progress"]
    r = run_eval_sbatch(env, RUN_DIR=str(run), REQUIRE_DONE="0", SKIP_EVAL="1", STAGES="sft")
    assert r.returncode != 0 and "stage sft" in r.stderr


def test_eval_sh_needs_an_hf_folder(stub_tr1, tmp_path):
    env, log = stub_tr1
    r = subprocess.run(["bash", str(EXAMPLES / "eval.sh"), str(tmp_path / "nothing")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "config.json" in r.stderr and not log.exists()


def test_eval_sh_runs_the_seeds_protocols(stub_tr1, tmp_path):
    env, log = stub_tr1
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    r = subprocess.run(["bash", str(EXAMPLES / "eval.sh"), str(model)], env={**env, "MODES": "custom r1",
                       "DATASETS": "charades_sta_test"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    assert [c.split("--protocol ")[1].split()[:3] for c in calls] == [["custom", "--max-tokens", "4096"],
                                                                      ["r1", "--max-tokens", "4096"]]
    assert not any("--parser" in c or "--no-think" in c for c in calls)


def test_data_configs_named_by_eval_sh_exist():
    text = (EXAMPLES / "eval.sh").read_text()
    names = re.search(r"DATASETS=\$\{DATASETS:-([^}]*)\}", text).group(1).split()
    assert names and all((EXAMPLES / "data" / f"{n}.yaml").is_file() for n in names)


# ---------------------------------------------------------------- the scripts use the CLI that exists

def cli_options(module: str) -> set[str]:
    """Every ``--option`` that ``module``'s ``add_arguments`` defines, read from its source (importing the CLI
    modules would pull in torch and megatron: seconds on a loaded 2-core machine)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    return set(re.findall(r'add_argument\(\s*(?:"[^"]*",\s*)*"(--[a-z][a-z-]*)"', path.read_text()))


def used_options(text: str, command: str) -> set[str]:
    """The ``--options`` on the (backslash-continued) lines that run ``command``."""
    text = text.replace("\\\n", " ")
    return {o for line in text.splitlines() if command in line and not line.lstrip().startswith("#")
            for o in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line.split(command, 1)[1])}


def test_scripts_use_existing_tr1_options():
    train = used_options(TRAIN_SBATCH.read_text(), "TRAIN_ARGS=(")
    assert train == {"--config", "--run-dir", "--resume"}
    assert train <= cli_options("megatron_tr1.rl.train_cli")
    eval_sh = (EXAMPLES / "eval.sh").read_text()
    eval_used = used_options(eval_sh, "tr1 eval") | used_options(eval_sh, "flags=(")
    assert {"--model", "--data", "--out", "--no-think"} <= eval_used <= cli_options("megatron_tr1.eval.evaluate")
    convert = used_options((SLURM / "eval.sbatch").read_text(), "tr1 convert mcore-to-hf")
    assert {"--mcore-dir", "--out"} <= convert <= cli_options("megatron_tr1.convert.cli")
