import json
import shutil
import subprocess
import sys

import pytest

from megatron_tr1.cli import main
from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.synthetic import generate
from megatron_tr1.eval.evaluate import FixedSpanPredictor, fit_fixed_span, score, summarize
from megatron_tr1.eval.metrics import grounding_metrics, parse_lmms_eval
from megatron_tr1.rewards import temporal_iou


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num=12, seed=0, size=32, progress=False)
    return out


def _sample(start, end, duration, dataset="d"):
    return Sample(f"/v/{start}.mp4", "q", start, end, duration, dataset, f"{start}#0")


def test_fit_fixed_span_recovers_a_constant_span():
    samples = [_sample(0.2 * d, 0.6 * d, d) for d in (5.0, 10.0, 30.0)]
    assert fit_fixed_span(samples) == (0.2, 0.6, pytest.approx(100.0))


def test_fixed_span_predictor_answers_fractions_of_each_duration():
    samples = [_sample(2.5, 5.0, 10.0, "a"), _sample(0.0, 5.0, 20.0, "b")]
    texts = FixedSpanPredictor("center", 0.25, 0.75).predict(samples)
    assert texts == ["<answer>2.50 - 7.50</answer>", "<answer>5.00 - 15.00</answer>"]
    rows = score(samples, texts)
    assert [r["pred"] for r in rows] == [[2.5, 7.5], [5.0, 15.0]]
    per = summarize(rows)
    assert set(per) == {"a", "b", "all"} and per["all"]["n"] == 2
    assert (per["a"]["mIoU"], per["b"]["mIoU"], per["all"]["mIoU"]) == (50.0, 0.0, 25.0)  # b only touches
    assert score(samples, ["junk", "<answer>0 - 5</answer>"])[1]["iou"] == 1.0


def test_readme_flow_writes_predictions_submission_and_metrics(synthetic, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--data", str(synthetic / "test.yaml"), "--baseline", "best-fixed",
                 "--fit-data", str(synthetic / "train.yaml"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best fixed span" in printed and "synthetic_test" in printed and "R@0.7" in printed
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(rows) == metrics["metrics"]["all"]["n"] == 3
    assert set(rows[0]) >= {"id", "video", "query", "gt", "pred", "iou", "raw"}
    lo, hi = metrics["fixed_span"]
    assert 0 <= lo < hi <= 1
    for row in rows:
        assert row["pred"] == pytest.approx([lo * row["duration"], hi * row["duration"]], abs=0.006)
    recomputed = grounding_metrics([tuple(r["pred"]) for r in rows], [tuple(r["gt"]) for r in rows])
    assert metrics["metrics"]["synthetic_test"] == pytest.approx(recomputed)
    # lmms-eval's offline evaluator reads the submission the same way: key video>>>query>>>[start, end]
    submission = json.loads((out / "submission.json").read_text())
    assert len(submission) == 3
    preds, gts = [], []
    for key, raw in submission.items():
        video, query, gt = key.split(">>>")
        assert video.endswith(".mp4") and "/" not in video and query
        gts.append(tuple(json.loads(gt)))
        preds.append(parse_lmms_eval(raw))
    assert grounding_metrics(preds, gts)["mIoU"] == pytest.approx(recomputed["mIoU"], abs=0.5)


def test_full_and_center_baselines_on_two_datasets(synthetic, tmp_path, capsys):
    both = tmp_path / "both.yaml"
    both.write_text(f"datasets:\n  - json_path: {synthetic}/test.json\n    data_folder: {synthetic}/videos\n"
                    f"  - json_path: {synthetic}/ood.json\n    data_folder: {synthetic}/videos\n")
    for baseline in ("full", "center"):
        assert main(["eval", "--data", str(both), "--baseline", baseline, "--out", str(tmp_path / baseline)]) == 0
        table = capsys.readouterr().out
        assert all(name in table for name in ("synthetic_test", "synthetic_ood", "all"))
    rows = [json.loads(line) for line in (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["pred"] == [0.0, pytest.approx(r["duration"], abs=0.006)] for r in rows)


def _error(args, capsys):
    code = main(["eval", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tr1 eval: error: ") and "\n" not in err
    return err


def test_bad_inputs_give_one_line_and_exit_2(synthetic, tmp_path, capsys):
    test_yaml = str(synthetic / "test.yaml")
    assert "does not exist" in _error(["--data", str(tmp_path / "missing.yaml"), "--baseline", "full"], capsys)
    assert "needed by --baseline best-fixed" in _error(["--data", test_yaml, "--baseline", "best-fixed"], capsys)
    (tmp_path / "key.yaml").write_text(f"datasets:\n  - json_path: {synthetic}/test.json\n    folder: videos\n")
    assert "unknown key(s) 'folder'" in _error(["--data", str(tmp_path / "key.yaml"), "--baseline", "full"], capsys)
    (tmp_path / "strat.yaml").write_text(f"datasets:\n  - json_path: {synthetic}/test.json\n"
                                         f"    data_folder: {synthetic}/videos\n    sampling_strategy: most\n")
    assert "sampling_strategy 'most'" in _error(["--data", str(tmp_path / "strat.yaml"), "--baseline", "full"], capsys)


def test_missing_video_strict_and_lenient(synthetic, tmp_path, capsys, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic, copy)
    (copy / "videos" / "test_00001.mp4").unlink()
    err = _error(["--data", str(copy / "test.yaml"), "--baseline", "full"], capsys)
    assert "test.json record 1: video file" in err and "test_00001.mp4' does not exist" in err
    assert main(["eval", "--data", str(copy / "test.yaml"), "--baseline", "full", "--lenient"]) == 0
    assert "skipped 1 of 3 samples: 1 missing video" in caplog.text


def test_console_script_end_to_end(synthetic, tmp_path):
    run = subprocess.run([sys.executable, "-m", "megatron_tr1.cli", "eval", "--data", str(tmp_path / "none.yaml"),
                          "--baseline", "full"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "none.yaml' does not exist" in run.stderr


def test_fit_matches_an_exhaustive_search_over_the_grid():
    samples = [_sample(s, e, d) for s, e, d in ((1, 3, 10), (0, 4, 8), (5, 9, 12), (2, 2.5, 5))]
    lo, hi, miou = fit_fixed_span(samples, step=0.1)
    grid = [i / 10 for i in range(11)]
    best = max((sum(temporal_iou((a * s.duration, b * s.duration), s.gt) for s in samples) / 4, a, b)
               for a in grid for b in grid if a < b)
    assert miou == pytest.approx(100 * best[0]) and (lo, hi) == pytest.approx(best[1:])
