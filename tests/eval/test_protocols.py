"""The seed's evaluation protocols (custom, r1) and ours (answer) on hand-made responses, every quirk of lmms-eval's
``eval_tvg.py`` included, and against a faithful re-implementation of that script (``_eval_tvg_reference``)."""
import json
import random

import pytest

from megatron_tr1.eval import protocols
from megatron_tr1.eval.protocols import (ScorerCrash, extract_time, extract_timestamps, score_responses,
                                         stored_answer)
from tests.eval import _eval_tvg_reference as reference

R1 = '<think>{think}</think>\n<answer>{{"start_time": "{s}", "end_time": "{e}"}}</answer>'


@pytest.mark.parametrize("text, spans", [
    ("The event happens in the 24.3 - 30.4 seconds.", [(24.3, 30.4)]),
    ("It happens from 5 to 10.", [(5.0, 10.0)]),  # every "to" becomes "-"
    ("It starts at 12.5to 20", [(12.5, 20.0)]),
    ("He walks into the room, 3 TO 4", [(3.0, 4.0)]),  # lower-cased first; "into" -> "in-" harmlessly
    ("10 - 5", [(5.0, 10.0)]),  # reversed spans are reordered
    ("first 1 - 2, then 3 - 4", [(1.0, 2.0)]),  # the first range wins
    ("<answer>1.2 - 3.4</answer>", [(1.2, 3.4)]),  # tags are just text
    ("2. - 3", [(2.0, 3.0)]),  # "2." is a number for float()
    ("A specific example is : 20.8 - 30.0 seconds. It happens in 2 - 3", [(2.0, 3.0)]),  # the prompt's example
    ("The start time is 3 seconds.\nThe end time is 7.5 seconds.", [(3.0, 7.5)]),  # keyword fallback
    ("It ends at 9! It starts at 4?", [(4.0, 9.0)]),  # keyword fallback, reordered
    ("The start time is 3 seconds, and the end time is 7.5.", []),  # one sentence: one number, dropped
    ("The start time is 3 seconds.", []),  # an odd count of numbers is dropped
    ("Begins at 3.\nFinishes at 7.", []),  # no keyword: no fallback
    ('{"start_time": "1.2", "end_time": "3.4"}', []),  # one line: only its first number
    ('{\n  "start_time": "1.2",\n  "end_time": "3.4"\n}', [(1.2, 3.4)]),  # one key per line: both
    ("The event starts at 00:00:18 and ends at 00:00:23.", []),  # the HH:MM:SS fallback never yields
    ("It starts at 00:00:18\nIt ends at 00:00:23", [(0.0, 0.0)]),  # read as hours by the number fallback
    ("I cannot tell.", []),
    ("", []),
])
def test_extract_time_reads_as_eval_tvg(text, spans):
    assert extract_time(text) == [pytest.approx(s) for s in spans]
    assert reference.extract_time(text) == [pytest.approx(list(s)) for s in spans]


@pytest.mark.parametrize("text", ["1..2 - 3", "It happens in 4 - 6, or maybe 1..2 - 3."])
def test_extract_time_raises_where_the_original_crashes(text):
    with pytest.raises(ScorerCrash, match="raises"):
        extract_time(text)
    with pytest.raises(ValueError):
        reference.extract_time(text)


@pytest.mark.parametrize("text, stored", [
    (R1.format(think="so", s="1.5", e="3"), "1.5-3.0"),
    ("Sure. " + R1.format(think="a\nb", s="2", e="4") + " bye", "2.0-4.0"),  # re.search: text around is fine
    (R1.format(think="x", s="5", e="2"), "5.0-2.0"),  # stored as written; extract_time reorders later
    (R1.format(think="x", s="1", e="2") + R1.format(think="y", s="3", e="4"), "1.0-2.0"),  # the first pair
    ('<think>x</think><answer>{"start_time": 1.5, "end_time": 3}</answer>', "0.0-0.0"),  # unquoted numbers
    ('<answer>{"start_time": "1.5", "end_time": "3"}</answer>', "0.0-0.0"),  # no think
    ('<think>x</think><answer>1.5 - 3</answer>', "0.0-0.0"),  # not the JSON
    (R1.format(think="x", s="1..2", e="3"), "0.0-0.0"),  # [\d.]+ matches, float() fails
    (R1.format(think="x", s="0.00001", e="2"), "1e-05-2.0"),  # Python's float repr, as stored by the original
    ("", "0.0-0.0"),
])
def test_extract_timestamps_reduces_r1_answers_as_the_r1_model_class(text, stored):
    assert extract_timestamps(text) == stored == stored_answer(text, "r1")
    assert stored_answer(text, "custom") == text == stored_answer(text, "answer")


def test_r1_float_repr_quirk_reads_through_extract_time():
    # "1e-05-2.0": the range regex finds "05-2.0", so the span is (2.0, 5.0), not (0.00001, 2.0)
    assert extract_time(extract_timestamps(R1.format(think="x", s="0.00001", e="2"))) == [(2.0, 5.0)]


GT = (2.0, 6.0)
CASES = [  # (response, {protocol: IoU against GT})
    (R1.format(think="t", s="2", e="6"), {"custom": 0.0, "r1": 1.0, "answer": 1.0}),
    (R1.format(think="t", s="6", e="2"), {"custom": 0.0, "r1": 1.0, "answer": 0.0}),  # reversed: r1 reorders
    (R1.format(think="t", s="4", e="6"), {"custom": 0.0, "r1": 0.5, "answer": 0.5}),
    ('<answer>{"start_time": 2, "end_time": 6}</answer>', {"custom": 0.0, "r1": 0.0, "answer": 1.0}),
    ("<answer>2 to 6</answer>", {"custom": 1.0, "r1": 0.0, "answer": 1.0}),
    ("The event happens in 3 - 6 seconds.", {"custom": 0.75, "r1": 0.0, "answer": 0.0}),
    ("It starts at 4.\nIt ends at 8.", {"custom": 1 / 3, "r1": 0.0, "answer": 0.0}),
    ("1..2 - 3", {"custom": 0.0, "r1": 0.0, "answer": 0.0}),  # the original crashes: counted 0
    ("no idea", {"custom": 0.0, "r1": 0.0, "answer": 0.0}),
]


@pytest.mark.parametrize("protocol", protocols.PROTOCOLS)
def test_score_responses_known_values(protocol):
    ious = [expected[protocol] for _, expected in CASES]
    m = score_responses([r for r, _ in CASES], [GT] * len(CASES), protocol)
    assert m["n"] == len(CASES)
    assert m["mIoU"] == pytest.approx(100 * sum(ious) / len(ious))
    for t in (0.3, 0.5, 0.7):
        assert m[f"R@{t}"] == pytest.approx(100 * sum(i >= t for i in ious) / len(ious))
    assert m["crashed"] == (1 if protocol == "custom" else 0)


def test_score_responses_counts_crashes_as_zero_and_reports_them():
    # a degenerate prediction equal to a ground-truth point (the r1 fallback against [0, 0]); a point inside a
    # reversed label; "1..2 - 3"
    responses = ["no answer", "4 - 4", "1..2 - 3", "1 - 3"]
    gts = [(0.0, 0.0), (5.0, 3.0), (0.0, 10.0), (1.0, 3.0)]
    m = score_responses(responses, gts, "r1")
    assert m["crashed"] == 1 and m["mIoU"] == 0.0  # r1 stores 0.0-0.0 for all; only [0, 0] divides by zero
    m = score_responses(responses, gts, "custom")
    assert m["crashed"] == 2 and m["mIoU"] == pytest.approx(25.0) and m["R@0.7"] == 25.0
    with pytest.raises(ZeroDivisionError):
        reference.iou([0.0, 0.0], reference.extract_time("0.0-0.0")[0])


def test_reversed_ground_truth_scores_zero_without_dropping():
    m = score_responses(["3 - 5", "3 - 5"], [(6.0, 2.0), (2.0, 6.0)], "custom")
    assert m["n"] == 2 and m["mIoU"] == pytest.approx(25.0)


def test_score_responses_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown evaluation protocol 'lmms'; choose from custom, r1, answer"):
        score_responses(["x"], [GT], "lmms")
    with pytest.raises(ValueError, match="2 responses for 1 ground truths"):
        score_responses(["x", "y"], [GT], "custom")
    assert score_responses([], [], "custom")["mIoU"] == 0.0


def _submission(tmp_path, responses, gts, protocol):
    path = tmp_path / f"{protocol}.json"
    path.write_text(json.dumps({f"v{i}.mp4>>>q {i}>>>{list(g)}": stored_answer(r, protocol)
                                for i, (r, g) in enumerate(zip(responses, gts))}))
    return path


@pytest.mark.parametrize("protocol", ["custom", "r1"])
def test_the_original_reading_loop_scores_our_stored_answers_to_the_same_numbers(tmp_path, protocol):
    responses = [r for r, _ in CASES if r != "1..2 - 3"]  # (the original would crash on it)
    gts = [(1.0 + 0.37 * i, 5.5 + 0.91 * i) for i in range(len(responses))]
    ours = score_responses(responses, gts, protocol)
    r3, r5, r7, miou, num = reference.score_file(_submission(tmp_path, responses, gts, protocol))
    assert num == ours["n"] and miou == pytest.approx(ours["mIoU"], abs=1e-9)
    assert (r3, r5, r7) == pytest.approx((ours["R@0.3"], ours["R@0.5"], ours["R@0.7"]))


_TOKENS = ["1", "2.5", "10", "3..4", "0", " ", " - ", "-", " to ", "to", ".", "\n", "!", "?", "starts", "end",
           "happens in", "start time", "00:00:18", "1:02:03", "seconds", "A specific example is : 20.8 - 30.0 seconds",
           "into", "at", "Start"]


def test_extract_time_equals_the_reference_on_random_texts():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(_TOKENS) for _ in range(rng.randint(0, 14)))
        try:
            want = reference.extract_time(text)
        except ValueError:
            with pytest.raises(ScorerCrash):
                extract_time(text)
            continue
        assert extract_time(text) == [tuple(s) for s in want], text
