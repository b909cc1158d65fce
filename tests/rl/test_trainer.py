"""The training loop: LR schedule, base-stage spans, and tiny end-to-end ``tr1 train`` runs (one gloo rank):
stopped by SIGUSR1 and resumed twice == uninterrupted; NaN losses skipped then fatal; refusing to overwrite."""
import math
import shutil
from types import SimpleNamespace

import pytest

from megatron_tr1.data.annotations import Sample
from megatron_tr1.rl.prompts import GroundingPrompt
from megatron_tr1.rl.trainer import Trainer, lr_at, random_span
from megatron_tr1.launch import run_ranks

from tests.rl import _trainer_cases as cases


def test_lr_schedule_hand_values():
    assert [lr_at(s, 10, 1.0, 0.0, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(2, 10, 1.0, 0.0, 2, "linear") == 1.0 and lr_at(6, 10, 1.0, 0.0, 2, "linear") == 0.5
    assert math.isclose(lr_at(6, 10, 1.0, 0.2, 2, "cosine"), 0.6)
    assert math.isclose(lr_at(10, 10, 1.0, 0.2, 2, "cosine"), 0.2)


def test_random_span_inside_the_video_and_seeded():
    sample = Sample(video="v.mp4", query="q", start=1.0, end=2.0, duration=7.5, dataset="d", id="v#0")
    spans = [random_span(sample, seed) for seed in range(200)]
    assert all(0 <= a < b <= 7.5 and b - a >= 0.5 - 1e-9 for a, b in spans)
    assert random_span(sample, 3) == spans[3] and len(set(spans)) > 150


def test_base_stage_trains_on_pretrain_labels_else_random_spans_of_train():
    def sample(split, i):
        return Sample(video=f"{split}{i}.mp4", query=split, start=1.0 + i, end=2.0 + i, duration=9.0, dataset=split,
                      id=f"{split}#{i}")

    def fake(splits):
        t = SimpleNamespace(cfg=SimpleNamespace(seed=0), samples={s: [sample(s, i) for i in range(3)] for s in splits})
        t.prompts = lambda split, indices, think: [GroundingPrompt(None, t.samples[split][i].gt, 9.0, split)
                                                   for i in indices]
        t.base_split = lambda: Trainer.base_split(t)
        return t

    with_pretrain = fake(["train", "pretrain"])
    items = Trainer.base_items(with_pretrain, [2, 0], step=5, think=True)
    assert [(i.query, i.gt) for i in items] == [("pretrain", (3.0, 4.0)), ("pretrain", (1.0, 2.0))]
    assert [Trainer.stage_split(with_pretrain, s) for s in ("base", "sft", "grpo")] == ["pretrain", "train", "train"]
    without = fake(["train"])
    spans = [i.gt for i in Trainer.base_items(without, [0, 1], step=5, think=False)]
    assert spans != [(1.0, 2.0), (2.0, 3.0)] and all(0 <= a < b <= 9.0 for a, b in spans)  # random, not the labels


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return run_ranks(cases.resume_case, 1, str(tmp_path_factory.mktemp("resume")), timeout=600)[0]


def test_stopped_and_resumed_run_equals_uninterrupted(resumed):
    assert resumed["status"] == ["done", "interrupted", "interrupted", "done"]
    assert resumed["sft_ckpts_after_stop"] == ["step_000002"]  # saved on the signal, not only every 3 steps
    straight, again = resumed["straight"], resumed["resumed"]
    assert set(straight) == {"base", "sft", "grpo", "results"}
    assert [r["step"] for r in again["sft"]] == [1, 2, 3, 4]  # no duplicated or missing records
    # the stage's own schedule (linear, to 0 at step 4) after 2 warm-up steps; optim.schedule stays constant
    assert [r["lr"] for r in straight["sft"]] == pytest.approx([1.5e-3, 3e-3, 3e-3, 1.5e-3])
    for stage in ("base", "sft", "grpo"):
        assert again[stage] == straight[stage], stage
    assert again["results"] == straight["results"]
    assert resumed["done"] == [True, True]


def test_results_json_has_every_stage_and_split(resumed):
    results = resumed["straight"]["results"]
    assert set(results) == {"base", "sft", "grpo", "ood", "protocols", "videoqa"}
    assert set(results["ood"]) == {"base", "sft", "grpo"}
    # eval.videoqa (default on): the synthetic multiple-choice splits, custom inference
    assert {s: set(v) for s, v in results["videoqa"].items()} == {s: {"mc_test", "mc_ood"} for s in
                                                                   ("base", "sft", "grpo")}
    for acc in (a for v in results["videoqa"].values() for a in v.values()):
        assert 0 <= acc["accuracy"] <= 100 and acc["n"] > 0 and 0 <= acc["answered"] <= acc["n"]
    protocols = results["protocols"]  # eval.seed_protocols (default on): the seed's table's rows
    assert {s: set(p) for s, p in protocols.items()} == {"base": {"custom"}, "sft": {"custom"}, "grpo": {"custom", "r1"}}
    for per_split in (p for stage in protocols.values() for p in stage.values()):
        assert set(per_split) == {"test", "ood"} and per_split["test"]["n"] == 4 and per_split["ood"]["n"] == 2
    for m in [results[s] for s in ("base", "sft", "grpo")] + list(results["ood"].values()):
        assert set(m) == {"n", "mIoU", "R@0.3", "R@0.5", "R@0.7"} and 0 <= m["mIoU"] <= 100
    assert results["base"]["n"] == 4 and results["ood"]["base"]["n"] == 2


def test_eval_every_logs_test_metrics_during_training(resumed):
    sft = resumed["straight"]["sft"]  # 4 steps, eval.every=2: step 2 (step 4 is the stage's final evaluation)
    assert ["eval/test/mIoU" in r for r in sft] == [False, True, False, False]
    assert 0 <= sft[1]["eval/test/mIoU"] <= 100 and "eval/test/R@0.5" in sft[1]
    assert not any("eval/test/mIoU" in r for r in resumed["straight"]["grpo"])  # 2 steps: final only


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path):
    message = run_ranks(cases.fresh_run_refuses_existing_checkpoints, 1, str(tmp_path), timeout=300)[0]
    assert message is not None and "--resume auto" in message and "checkpoints" in message


def test_nan_losses_skip_the_step_then_stop(tmp_path):
    out = run_ranks(cases.nan_case, 1, str(tmp_path), timeout=300)[0]
    assert out["error"] is not None and "3 consecutive steps" in out["error"]
    assert out["seen"][0][1] == 0 and [s for _, s, _ in out["seen"][1:]] == [1, 1]  # third NaN raises
    assert all(g is None for _, _, g in out["seen"][1:])


def test_tp2_run_then_resume_at_tp1_reshards_or_says_why(tmp_path):
    root = str(tmp_path / "run")
    out = run_ranks(cases.tp2_case, 2, root, timeout=600)
    assert [o["status"] for o in out] == ["interrupted"] * 2
    grpo = out[0]["metrics"]["grpo"]
    assert len(grpo) == 1 and grpo[0]["logprob_mismatch/max"] < 1e-4  # rank 0's samples, TP=2 log-probs
    assert out[0]["metrics"]["sft"][-1]["loss"] < out[0]["metrics"]["sft"][0]["loss"] + 1.0

    refused = run_ranks(cases.tp1_resume_case, 1, root, timeout=300)[0]
    assert "TP=2 x PP=1 x DP=1" in refused["error"] and "checkpoint.reset_optimizer=true" in refused["error"]
    resumed = run_ranks(cases.tp1_resume_case, 1, root, "checkpoint.reset_optimizer=true", timeout=300)[0]
    assert resumed["status"] == "done" and [r["step"] for r in resumed["metrics"]["grpo"]] == [1, 2]
    assert resumed["metrics"]["grpo"][0] == grpo[0]  # the record of the step before the stop is kept
    assert resumed["metrics"]["results"]["grpo"]["n"] == 4


def test_eval_model_on_a_trained_stage_reproduces_the_run(resumed, tmp_path):
    """``tr1 eval --model RUN/stages/sft/model`` (a tr1 Megatron folder, exported on the fly, frame budget from the
    run's config.yaml) scores what the trainer scored at the end of the stage."""
    import json

    from megatron_tr1.cli import main

    run = f"{resumed['root']}/straight"
    assert main(["eval", "--data", f"{run}/data/test.yaml", "--model", f"{run}/stages/sft/model", "--no-think",
                 "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["think"] is False and metrics["metrics"]["all"] == resumed["straight"]["results"]["sft"]


def test_pp2_run_matches_pp1(tmp_path):
    """PP=2 (1F1B through megatron-core's schedule): SFT losses equal PP=1's, and GRPO's engine samples have the
    log-probs the last stage recomputes (metrics come from the last stage)."""
    pp2 = run_ranks(cases.layout_case, 2, str(tmp_path / "pp2"), 1, 2, timeout=600)[0]
    shutil.copytree(tmp_path / "pp2" / "data", tmp_path / "pp1" / "data")  # the same videos (H.264 is not byte-exact)
    pp1 = run_ranks(cases.layout_case, 1, str(tmp_path / "pp1"), 1, 1, timeout=600)[0]
    assert pp2["status"] == pp1["status"] == "done"
    for a, b in zip(pp2["metrics"]["sft"], pp1["metrics"]["sft"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3
    grpo = pp2["metrics"]["grpo"][0]
    assert grpo["logprob_mismatch/max"] < 1e-4 and grpo["loss"] != 0.0 and grpo["entropy"] > 0
    assert pp2["metrics"]["results"]["sft"] == pp1["metrics"]["results"]["sft"]


def test_engine_sleeps_except_to_sync_generate_and_evaluate(tmp_path):
    """The stage loop owns the engine's sleep: asleep at every training step of base, SFT and GRPO (on a GPU vLLM
    would otherwise hold its memory share through thousands of SFT steps), awake at every weight load and
    every generation (rollouts and evaluations), asleep after the run."""
    (out,) = run_ranks(cases.engine_sleep_case, 1, str(tmp_path), timeout=600)
    seen = out["seen"]
    assert out["status"] == "done"
    assert len(seen["train"]) >= 6 and not any(seen["train"]), seen["train"]
    assert seen["generate"] and all(seen["generate"]), seen["generate"]
    assert seen["load"] and all(seen["load"]), seen["load"]
    assert out["awake_at_end"] is False
