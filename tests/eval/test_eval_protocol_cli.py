"""``tr1 eval --protocol custom|r1|answer``: the prompt each asks the model for, what ``submission.json`` stores,
and the seed's scorer (``_eval_tvg_reference``, its reading loop) reading our file to our numbers."""
import json

import pytest

from megatron_tr1.cli import main
from megatron_tr1.data.synthetic import generate
from megatron_tr1.eval import evaluate
from megatron_tr1.eval.protocols import extract_timestamps
from tests.eval import _eval_tvg_reference as reference

R1 = '<think>t</think>\n<answer>{{"start_time": "{s}", "end_time": "{e}"}}</answer>'


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num=24, seed=1, size=32, progress=False)
    return out


@pytest.fixture
def fake_model(monkeypatch):
    """``--model`` without a model: canned answers of every kind; records the prompt mode and token budget."""
    asked = {}

    class Predictor:
        name = "fake"

        def predict(self, samples):
            answers = []
            for i, s in enumerate(samples):
                d = s.duration
                answers.append([
                    R1.format(s=f"{s.start:.1f}", e=f"{s.end:.1f}"),  # read by r1 and answer
                    R1.format(s=f"{0.9 * d:.2f}", e=f"{0.1 * d:.2f}"),  # reversed: r1 reorders it
                    f"The event happens in {s.start:.1f} to {s.end + 0.3:.1f} seconds.",  # custom
                    "It starts at 0.\nIt ends at 1.",  # keyword fallback
                    "1..2 - 3",  # the seed's scorer crashes: counted 0
                    "I do not know.",
                ][i % 6])
            return answers

    def load(model_dir, engine, budget, think, max_tokens, **kw):
        asked.update(think=think, max_tokens=max_tokens)
        return Predictor()

    monkeypatch.setattr("megatron_tr1.eval.model_predictor.load_model_predictor", load)
    return asked


@pytest.mark.parametrize("protocol, mode", [("custom", "custom"), ("r1", "r1"), ("answer", True)])
def test_protocol_prompts_stores_and_scores_as_the_seed(synthetic, tmp_path, fake_model, protocol, mode, capsys):
    out = tmp_path / protocol
    assert main(["eval", "--data", str(synthetic / "test.yaml"), "--model", str(tmp_path / "m"),
                 "--protocol", protocol, "--out", str(out)]) == 0
    assert fake_model == {"think": mode, "max_tokens": 4096}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    submission = json.loads((out / "submission.json").read_text())
    assert metrics["protocol"] == protocol and metrics["max_tokens"] == 4096
    assert list(submission.values()) == [extract_timestamps(r["raw"]) if protocol == "r1" else r["raw"] for r in rows]
    if protocol == "answer":
        return
    assert "(" + protocol + " protocol)" in capsys.readouterr().out
    r3, r5, r7, miou, num = _score_without_crashes(out / "submission.json", tmp_path)
    m = metrics["metrics"]["all"]
    assert num == m["n"] == len(rows)
    assert (miou, r3, r5, r7) == pytest.approx((m["mIoU"], m["R@0.3"], m["R@0.5"], m["R@0.7"]), abs=1e-9)
    assert metrics["crashed"] == (1 if protocol == "custom" else 0)  # the 5th of 6 answers: "1..2 - 3"
    assert m["mIoU"] > 5  # the answers near the truth count


def _score_without_crashes(path, tmp_path):
    """The seed's script on our file; the answers it crashes on are replaced by ones it reads as IoU 0 (``"x"``),
    which is how we count them."""
    data = json.loads(path.read_text())
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps({k: ("x" if v == "1..2 - 3" else v) for k, v in data.items()}))
    if any(v == "1..2 - 3" for v in data.values()):
        with pytest.raises(ValueError):
            reference.score_file(path)
    return reference.score_file(clean)


def test_repeated_keys_are_scored_once_as_the_seeds_submission_dict(synthetic, tmp_path, fake_model):
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"datasets:\n  - json_path: {synthetic}/test.json\n    data_folder: {synthetic}/videos\n"
                     f"  - json_path: {synthetic}/test.json\n    data_folder: {synthetic}/videos\n")
    assert main(["eval", "--data", str(twice), "--model", str(tmp_path / "m"), "--protocol", "custom",
                 "--out", str(tmp_path / "o")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    rows = (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()
    r3, r5, r7, miou, num = _score_without_crashes(tmp_path / "o" / "submission.json", tmp_path)
    assert num == metrics["metrics"]["all"]["n"] == len(rows) // 2
    assert miou == pytest.approx(metrics["metrics"]["all"]["mIoU"])


def test_protocol_options_that_do_not_go_together(synthetic, tmp_path, capsys):
    for extra in (["--no-think"], ["--parser", "lmms-eval"]):
        code = main(["eval", "--data", str(synthetic / "test.yaml"), "--baseline", "full", "--protocol", "r1",
                     *extra])
        err = capsys.readouterr().err
        assert code == 2 and "go with --protocol answer, not --protocol r1" in err


def test_evaluation_keeps_every_label_and_reports_the_odd_ones(synthetic, tmp_path, capsys):
    records = json.loads((synthetic / "test.json").read_text())
    records[0]["solution"] = records[0]["solution"][::-1]  # start > end
    records[1]["solution"] = [records[1]["solution"][0], 1.3]  # ends past the video
    (tmp_path / "test.json").write_text(json.dumps(records))
    (tmp_path / "t.yaml").write_text(f"datasets:\n  - json_path: test.json\n    data_folder: {synthetic}/videos\n")
    assert main(["eval", "--data", str(tmp_path / "t.yaml"), "--baseline", "full", "--protocol", "custom",
                 "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "kept as written: " in printed and "1 start > end" in printed and "1 end past the duration" in printed
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["metrics"]["all"]["n"] == len(records)
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["gt"][0] > rows[0]["gt"][1] and rows[0]["iou"] == 0.0


def test_score_reads_each_protocol():
    sample = evaluate.Sample("/v/a.mp4", "q", 2.0, 6.0, 10.0, "d", "a#0")
    text = R1.format(s="6", e="2")
    (custom,), (r1,), (answer,) = (evaluate.score([sample], [text], protocol=p) for p in ("custom", "r1", "answer"))
    assert (custom["iou"], r1["iou"], answer["iou"]) == (0.0, 1.0, 0.0)
    assert r1["stored"] == "6.0-2.0" and r1["pred"] == [2.0, 6.0] and custom["status"] == "no span"
    with pytest.raises(evaluate.ConfigError, match="unknown evaluation protocol"):
        evaluate.score([sample], [text], protocol="lmms")
