"""``tr1 eval --task mvbench``: lmms-eval's MVBench prompt and answer reading, the loader's errors, the baselines
end to end on an MVBench-layout fixture built here (synthetic videos, two sub-task files)."""
import json

import pytest
import yaml

from megatron_tr1.cli import main
from megatron_tr1.data.synthetic import generate
from megatron_tr1.data.synthetic_mc import write_mc_split
from megatron_tr1.data.videoqa import MCSample, load_mvbench
from megatron_tr1.errors import DataError
from megatron_tr1.eval.mvbench import (OptionBaseline, is_correct, lmms_eval_option, mvbench_text, score,
                                       stored_answer, summarize)


@pytest.mark.parametrize("text, read", [
    ("A", "A"), ("(B)", "B"), ("B\n", "B"), ("C. a red square appears", "C"), ("a. red square", "A"),
    ("The answer is D.", "D"), ("E) none", "E"), ("Answer: (C) the screen turns green", "C"),
    ("Best option: (A)", "A"), ("Option B is right", "B"), ("'B'", "B"), ('"D"', "D"), ("[C]", "C"),
    ("b", "B"), ("  (e)  ", "E"),
    # the reader's quirks, kept: the first standalone a-e wins, an article "a" included; no F and beyond
    ("I think a red square appears, so B", "A"), ("(F) something", "f something"), ("F", "f"),
    ("None of the options.", "none of the options"), ("1.5", "1.5"), ("", ""),
    ("B. first\nsecond line", "B"),  # "X." at the start only when the rest is one line...
    ("It is B.\nC. no", "B"),  # ... else the first standalone letter
])
def test_lmms_eval_option_reading(text, read):
    assert lmms_eval_option(text) == read


@pytest.mark.parametrize("response, protocol, right", [
    ("B", "custom", True), ("(B) y", "custom", True), ("A", "custom", False), ("", "custom", False),
    ("<think>t</think><answer>(B) y</answer>", "r1", True),
    ("<think>B is wrong</think><answer>A</answer>", "r1", False),  # read inside <answer> only
    ("<think>t</think> B", "r1", False),  # no <answer>: nothing stored
    ("<answer>A</answer> <answer>B</answer>", "r1", True),  # the last one
    ("<think>t</think><answer>B</answer>", "answer", True), ("B", "answer", False),  # ours: strict tags
    ("<answer>B. y</answer>", "answer", False),
])
def test_protocol_readings(response, protocol, right):
    assert is_correct(response, "B", protocol)[0] is right


def test_stored_answer_and_prompt_text():
    assert stored_answer("<answer> C </answer>", "r1") == "C" and stored_answer("x", "r1") == ""
    s = MCSample(video="v.mp4", question="What moves?", candidates=("a ball", "a box"), answer=1, dataset="d",
                 id="d#0")
    assert mvbench_text(s) == "Question:What moves?\nOption:\n(A) a ball\n(B) a box\nOnly give the best option.\n"
    assert s.letter == "B"


def test_summary_accuracy_over_all_and_lmms_eval_aggregation():
    samples = [MCSample("v", "q", ("x", "y"), k % 2, "sub" + str(k // 2), f"id{k}") for k in range(4)]
    rows = score(samples, ["A", "", "B", None], "custom")  # right, empty, wrong, skipped
    m = summarize(rows)
    assert m["overall"] == {"accuracy": pytest.approx(100 / 3), "n": 3, "answered": 2, "lmms_eval_accuracy": 50.0}
    assert m["sub0"]["n"] == 2 and m["sub1"] == {"accuracy": 0.0, "n": 1, "answered": 1, "lmms_eval_accuracy": 0.0}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """Synthetic videos, their two synthetic sub-tasks, and a hand-written MVBench file with clip bounds."""
    root = tmp_path_factory.mktemp("mvbench")
    generate(root, num=1, num_test=8, num_ood=0, size=32, progress=False)
    config = write_mc_split(root, json.loads((root / "test.json").read_text()), "test", seed=0)
    records = [{"video": f"test_0000{i}.mp4", "question": "What is shown?", "candidates": ["x", "y", "z"],
                "answer": "y", "start": 0.5, "end": 3.0} for i in range(3)]
    (root / "clips.json").write_text(json.dumps(records))
    cfg = yaml.safe_load(config.read_text())
    cfg["datasets"].append({"json_path": "clips.json", "data_folder": "videos", "task": "videoqa_mc",
                            "format": "mvbench"})
    (root / "all.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_synthetic_split_is_mvbench_layout(fixture):
    which = load_mvbench(fixture / "mc_test" / "which_event.json", fixture / "videos")
    when = load_mvbench(fixture / "mc_test" / "when_event.json", fixture / "videos")
    assert [s.answer for s in which.samples] == [0, 1, 2, 3, 0, 1, 2, 3]  # the right option rotates A-D
    assert all(len(s.candidates) == 4 and len(set(s.candidates)) == 4 for s in which.samples)
    assert all(s.candidates == ("at the beginning", "in the middle", "at the end") for s in when.samples)
    clips = load_mvbench(fixture / "clips.json", fixture / "videos")
    assert (clips.samples[0].start, clips.samples[0].end, clips.samples[0].dataset) == (0.5, 3.0, "clips")


@pytest.mark.parametrize("baseline, overall", [("first", 100 * (2 + 3) / 19), ("random", None)])
def test_baselines_end_to_end(fixture, tmp_path, capsys, baseline, overall):
    out = tmp_path / baseline
    assert main(["eval", "--task", "mvbench", "--data", str(fixture / "all.yaml"), "--baseline", baseline,
                 "--protocol", "custom", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"overall", "which_event", "when_event", "clips"}
    assert [metrics[k]["n"] for k in ("overall", "which_event", "when_event", "clips")] == [19, 8, 8, 3]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 19 and rows[-1]["start"] == 0.5 and rows[-1]["gt"] == "B"
    assert metrics["overall"]["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in rows) / 19)
    if overall is not None:  # which_event: A right 2 of 8; when_event: 3 of 8 events centred in the first third
        first_thirds = sum(r["gt"] == "A" for r in rows if r["dataset"] == "when_event")
        assert metrics["overall"]["accuracy"] == pytest.approx(100 * (2 + first_thirds) / 19)
    assert "overall" in capsys.readouterr().out
    again = tmp_path / "again"
    main(["eval", "--task", "mvbench", "--data", str(fixture / "all.yaml"), "--baseline", baseline, "--out",
          str(again), "--protocol", "custom"])
    assert (again / "metrics.json").read_text() == (out / "metrics.json").read_text()  # seeded


def _bad_file(fixture, tmp_path, records):
    (tmp_path / "bad.json").write_text(json.dumps(records))
    config = {"datasets": [{"json_path": str(tmp_path / "bad.json"), "data_folder": str(fixture / "videos"),
                            "format": "mvbench"}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    return ["eval", "--task", "mvbench", "--data", str(tmp_path / "bad.yaml"), "--baseline", "first",
            "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("record, reason, message", [
    ({"video": "nope.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x"}, "missing video",
     "nope.mp4' does not exist"),
    ({"video": "test_00000.mp4", "question": "q", "answer": "x"}, "no candidates", "'candidates' must be"),
    ({"video": "test_00000.mp4", "question": "q", "candidates": [], "answer": "x"}, "no candidates",
     "'candidates' must be"),
    ({"video": "test_00000.mp4", "question": "q", "candidates": ["x"], "answer": "w"}, "answer not among candidates",
     "'answer' 'w' is none of"),
    ({"video": "test_00000.mp4", "question": "q", "candidates": ["x"], "answer": "x", "start": 3, "end": 1},
     "bad clip bounds", "start 3.0 >= end 1.0"),
])
def test_bad_records_strict_error_lenient_skip(fixture, tmp_path, capsys, record, reason, message):
    good = {"video": "test_00001.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x"}
    run = _bad_file(fixture, tmp_path, [good, record])
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "bad.json record 1" in err and message in err
    assert main(run + ["--lenient"]) == 0
    assert f"skipped 1 of 2 records: 1 {reason}" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["overall"]["n"] == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["skipped_records"] == {reason: 1}


def test_bad_files_and_arguments(fixture, tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json:1:2: not valid JSON"):
        load_mvbench(tmp_path / "x.json", fixture)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="non-empty JSON list"):
        load_mvbench(tmp_path / "x.json", fixture)
    data = ["--data", str(fixture / "mc_test.yaml")]
    assert main(["eval", "--task", "mvbench", *data, "--baseline", "full"]) == 2
    assert "takes --baseline first or random" in capsys.readouterr().err
    assert main(["eval", *data, "--baseline", "first"]) == 2
    assert "use it with --task mvbench" in capsys.readouterr().err
    assert main(["eval", "--task", "mvbench", "--data", str(fixture / "test.yaml"), "--baseline", "first"]) == 2
    assert "--task mvbench reads format: mvbench files" in capsys.readouterr().err  # a grounding config


def test_option_baseline_wraps_its_letter_for_each_protocol():
    s = MCSample("v", "q", ("x", "y", "z"), 0, "d", "d#0")
    for protocol in ("custom", "r1", "answer"):
        assert is_correct(OptionBaseline("first").predict([s], protocol)[0], "A", protocol)[0]
