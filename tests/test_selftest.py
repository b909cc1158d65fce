"""``tr1 selftest``: the ``--quick`` run CI does (every CPU check passes, every GPU-only check is skipped with its
reason, the JSON holds the machine and the numbers), and that a failing check is a FAIL row with exit 1 while the
other checks still run.

The ``--quick`` run spawns one rank process for the megatron checks: ~30-40 s on 2 cores.
"""
import json
import logging

import pytest

from megatron_tr1.backend import cuda_available
from megatron_tr1.cli import main
from megatron_tr1.selftest import registry, video_checks
from megatron_tr1.selftest.registry import Check, Measured

CPU_CHECKS = {c.name for c in registry.CHECKS if c.cpu}
GPU_CHECKS = {c.name for c in registry.CHECKS if not c.cpu}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "tmp" / "selftest.json"
    code = main(["selftest", "--quick", "--out", str(out)])
    return code, json.loads(out.read_text())


def test_quick_passes_every_cpu_check(quick_run):
    code, report = quick_run
    rows = {r["name"]: r for r in report["checks"]}
    assert code == 0 and report["exit_code"] == 0 and report["quick"] is True
    assert set(rows) == CPU_CHECKS | GPU_CHECKS
    failed = {n: (rows[n]["status"], rows[n]["value"]) for n in CPU_CHECKS if rows[n]["status"] != "pass"}
    assert not failed, failed
    for name in CPU_CHECKS:
        assert rows[name]["seconds"] > 0 and rows[name]["tolerance"] and rows[name]["value"] is not None
    assert report["summary"] == {"pass": len(CPU_CHECKS), "FAIL": 0, "skipped": len(GPU_CHECKS)}


def test_quick_skips_gpu_checks_with_their_reason(quick_run):
    _, report = quick_run
    rows = {r["name"]: r for r in report["checks"]}
    for name in GPU_CHECKS:
        assert rows[name]["status"] == "skipped" and rows[name]["reason"], rows[name]
        assert rows[name]["seconds"] is None
        if not cuda_available():
            assert rows[name]["reason"] == "no CUDA GPU"


def test_quick_json_holds_the_machine_and_the_numbers(quick_run):
    _, report = quick_run
    machine = report["machine"]
    assert machine["hostname"] and machine["cpu"] and machine["cpu_cores"] >= 1
    assert all(machine["versions"][k] for k in ("torch", "triton", "transformers", "megatron-core"))
    assert isinstance(machine["gpus"], list)
    rows = {r["name"]: r for r in report["checks"]}
    model = rows["model_vs_hf.fp32"]["numbers"]
    assert 0 <= model["logits_rel_err"] < 1e-5 and 0 <= model["logprobs_abs_err"] < 1e-5
    kernels = rows["kernels.vs_reference"]["numbers"]
    assert len([k for k in kernels if k.startswith(("fused_", "grpo_"))]) >= 15  # every value and gradient
    assert rows["rollout.hf_sync.fp32"]["numbers"]["logprob_mismatch_max"] < 1e-4
    assert rows["rollout.hf_sync.fp32"]["numbers"]["sync_buckets"] > 1
    grpo = rows["grpo.tp1.fp32"]["numbers"]
    assert grpo["status"] == "done" and len(grpo["per_step"]) == 3
    assert rows["video.pyav"]["numbers"]["indices"] == [0, 6, 12, 17, 23, 29]
    workers = report["workers"]
    assert len(workers) == 1 and workers[0]["starts"] == 1 and workers[0]["world_size"] == 1
    assert report["seconds"] > 0


def _explodes():
    raise RuntimeError("the decoder fell over\nFloatingPointError: the last line of the message")


@pytest.fixture
def local_checks(monkeypatch):
    """A registry of in-process checks: one raising, one over its tolerance, then the real PyAV check."""
    monkeypatch.setattr(video_checks, "explodes", _explodes, raising=False)
    monkeypatch.setattr(video_checks, "over_tolerance", lambda: Measured(2.5, "<= 1", False, {"x": 2.5}),
                        raising=False)
    target = "megatron_tr1.selftest.video_checks"
    checks = [Check("t.explodes", f"{target}:explodes", "raises", where="local"),
              Check("t.over", f"{target}:over_tolerance", "over its tolerance", where="local"),
              registry.BY_NAME["video.pyav"],
              Check("t.gpu", f"{target}:explodes", "never runs here", needs=("cuda", "vllm"), where="rank")]
    monkeypatch.setattr(registry, "CHECKS", checks)
    monkeypatch.setattr(registry, "BY_NAME", {c.name: c for c in checks})
    if cuda_available():
        monkeypatch.setattr(registry, "skip_reason", lambda c, caps, quick: "test" if c.name == "t.gpu" else None)


def test_a_failing_check_is_a_fail_row_and_exit_1_and_the_others_run(local_checks, tmp_path, capsys):
    out = tmp_path / "st.json"
    assert main(["selftest", "--out", str(out)]) == 1
    rows = {r["name"]: r for r in json.loads(out.read_text())["checks"]}
    assert rows["t.explodes"]["status"] == "FAIL"
    assert rows["t.explodes"]["value"] == "FloatingPointError: the last line of the message"
    assert "Traceback" in rows["t.explodes"]["traceback"] and "_explodes" in rows["t.explodes"]["traceback"]
    assert rows["t.over"]["status"] == "FAIL" and rows["t.over"]["value"] == 2.5
    assert rows["t.over"]["numbers"] == {"x": 2.5}
    assert rows["video.pyav"]["status"] == "pass"  # ran after the two failures
    assert rows["t.gpu"]["status"] == "skipped"
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "2 failed" in captured.out
    assert "running t.explodes" in captured.err and "Traceback" not in captured.err  # tracebacks with -v only


def test_verbose_prints_the_tracebacks(local_checks, tmp_path, capsys):
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)  # what `tr1 -v` sets (its basicConfig is a no-op under pytest's log handlers)
    try:
        assert main(["-v", "selftest", "--only", "t.explodes", "--out", str(tmp_path / "st.json")]) == 1
    finally:
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "--- t.explodes ---" in err and "Traceback" in err and "the decoder fell over" in err


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["selftest", "--only", "no.such.check", "--out", str(tmp_path / "st.json")]) == 2
    assert "unknown check(s) ['no.such.check']" in capsys.readouterr().err
    assert not (tmp_path / "st.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["selftest", "--no-such-option"])
    assert e.value.code == 2
