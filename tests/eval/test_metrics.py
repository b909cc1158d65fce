import pytest

from megatron_tr1.eval.metrics import grounding_metrics, parse_lmms_eval


def test_grounding_metrics_known_values():
    preds = [(0.0, 10.0), (0.0, 5.0), None, (0.0, 3.0), (5.0, 1.0)]
    gts = [(0.0, 10.0)] * 5
    m = grounding_metrics(preds, gts)
    # IoUs 1, 0.5, 0 (unparsable), 0.3 (R@0.3 counts >=), 0 (start > end)
    assert m["n"] == 5
    assert m["mIoU"] == pytest.approx(100 * 1.8 / 5)
    assert (m["R@0.3"], m["R@0.5"], m["R@0.7"]) == (60.0, 40.0, 20.0)


def test_grounding_metrics_rejects_mismatched_lengths_and_handles_empty():
    with pytest.raises(ValueError, match="2 predictions for 1 ground truths"):
        grounding_metrics([None, None], [(0, 1)])
    assert grounding_metrics([], []) == {"n": 0, "mIoU": 0.0, "R@0.3": 0.0, "R@0.5": 0.0, "R@0.7": 0.0}


@pytest.mark.parametrize(
    "text, span",
    [
        ("The event 'person turn a light on' happens in the 24.3 - 30.4 seonds.", (24.3, 30.4)),
        ("It happens from 5 to 10.", (5.0, 10.0)),  # every "to" becomes "-"
        ("10 - 5", (5.0, 10.0)),  # reordered
        ("first 1 - 2, then 3 - 4", (1.0, 2.0)),  # the first range wins
        ("<answer>1.2 - 3.4</answer>", (1.2, 3.4)),  # tags are just text
        ("A specific example is : 20.8 - 30.0 seconds. It happens in 2 - 3", (2.0, 3.0)),
        ("The start time is 3 seconds.\nThe end time is 7.5 seconds.", (3.0, 7.5)),  # keyword fallback
        ("The start time is 3 seconds.", None),  # an odd count of numbers is dropped
        ('{"start_time": "1.2", "end_time": "3.4"}', None),  # one line: only the first number is taken
        ("1..2 - 3", None),  # lmms-eval crashes on this match; here it is skipped
        ("I cannot tell.", None),
    ],
)
def test_parse_lmms_eval_matches_lmms_eval_extract_time(text, span):
    assert parse_lmms_eval(text) == (pytest.approx(span) if span else None)
