import math

import pytest

from megatron_tr1.rewards import REWARDS, parse_answer, temporal_iou, tvg_reward, tvg_reward_distance, tvg_reward_no_think

GOOD = '<think>the square shows at 2 s</think>\n<answer>{"start_time": "1.5", "end_time": "4.5"}</answer>'


@pytest.mark.parametrize(
    "pred, gt, iou",
    [
        ((0, 10), (0, 10), 1.0),
        ((0, 2), (1, 3), 1 / 3),
        ((1, 3), (0, 2), 1 / 3),
        ((0, 10), (2, 4), 0.2),
        ((0, 1), (2, 3), 0.0),  # disjoint
        ((0, 2), (2, 3), 0.0),  # touching
        ((1, 1), (0, 2), 0.0),  # degenerate prediction
        ((1, 1), (1, 1), 0.0),  # degenerate both
        ((3, 1), (0, 4), 0.0),  # start > end in the prediction
        ((0, 4), (3, 1), 0.0),  # start > end in the ground truth
        ((math.nan, 1), (0, 1), 0.0),
    ],
)
def test_temporal_iou(pred, gt, iou):
    assert temporal_iou(pred, gt) == pytest.approx(iou)


def test_temporal_iou_is_in_unit_interval_and_scale_invariant_like_the_seeds_fractions():
    spans = [(a / 3, b / 3) for a in range(-2, 9) for b in range(-2, 9)]
    for p in spans:
        for g in spans[::7]:
            iou = temporal_iou(p, g)
            assert 0.0 <= iou <= 1.0
            # the seed divides by video_length before the IoU; in seconds it is the same number
            assert temporal_iou((p[0] / 7.5, p[1] / 7.5), (g[0] / 7.5, g[1] / 7.5)) == pytest.approx(iou)


@pytest.mark.parametrize(
    "text, span",
    [
        (GOOD, (1.5, 4.5)),
        ('<answer>{"start_time": 1.5, "end_time": 4}</answer>', (1.5, 4.0)),
        ("<answer> 1.2 to 3.4 </answer>", (1.2, 3.4)),
        ("<answer>1.2 - 3.4</answer>", (1.2, 3.4)),
        ("<answer>1.2-3.4</answer>", (1.2, 3.4)),
        ("<answer>5 - 2</answer>", (5.0, 2.0)),  # returned as written; the IoU treats it as invalid
        ('<answer>0 - 1</answer> oops <answer>{"start_time": "7", "end_time": "9"}</answer>', (7.0, 9.0)),
        ("<answer>\n{\n \"start_time\": \"0.0\",\n \"end_time\": \"2.5\"\n}\n</answer>", (0.0, 2.5)),
        ("1.2 - 3.4", None),  # no answer tags
        ("<answer>around 3 seconds</answer>", None),
        ("<answer>from 1.2 to 3.4 s</answer>", None),
        ('<answer>{"start_time": "1.2"}</answer>', None),
        ('<answer>{"start_time": "a", "end_time": "3"}</answer>', None),
        ('<answer>{"start_time": true, "end_time": 3}</answer>', None),
        ('<answer>{"start_time": "1.2", "end_time": "3.4"} extra</answer>', None),
        ("<answer>[1.2, 3.4]</answer>", None),
        ("", None),
    ],
)
def test_parse_answer(text, span):
    assert parse_answer(text) == span


def test_tvg_reward_perfect_answer():
    assert tvg_reward(GOOD, (1.5, 4.5), 10.0) == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}


@pytest.mark.parametrize(
    "response, fmt",
    [
        (GOOD, 1.0),
        ('<think>x</think><answer>{"start_time":"1.5","end_time":"4.5"}</answer>', 1.0),
        ('<think>a\nb</think>  <answer> { "start_time" : "1.5" , "end_time" : "4.5" } </answer>', 1.0),
        ('<answer>{"start_time": "1.5", "end_time": "4.5"}</answer>', 0.0),  # no think
        ('<think>x</think><answer>{"start_time": 1.5, "end_time": 4.5}</answer>', 0.0),  # numbers must be quoted
        (GOOD + "\n", 0.0),  # fullmatch: nothing after </answer>
        (" " + GOOD, 0.0),  # ... or before <think>
        ("<think>x</think><answer>1.5 - 4.5</answer>", 0.0),
    ],
)
def test_tvg_format_follows_the_seed_regex_with_fullmatch(response, fmt):
    out = tvg_reward(response, (1.5, 4.5), 10.0)
    assert out["format"] == fmt
    assert out["accuracy"] == 1.0  # every response above answers the right span
    assert out["overall"] == pytest.approx(0.5 + 0.5 * fmt)


def test_tvg_reward_mixes_accuracy_and_format_with_the_weight():
    response = '<think>x</think><answer>{"start_time": "0", "end_time": "2"}</answer>'
    out = tvg_reward(response, (1.0, 3.0), 10.0, format_weight=0.1)
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["overall"] == pytest.approx(0.9 / 3 + 0.1)
    assert tvg_reward("no answer", (1.0, 3.0), 10.0) == {"overall": 0.0, "format": 0.0, "accuracy": 0.0}


def test_no_think_variant_wants_the_answer_alone():
    bare = '<answer>{"start_time": "1.5", "end_time": "4.5"}</answer>'
    assert tvg_reward_no_think(bare, (1.5, 4.5), 10.0)["format"] == 1.0
    assert tvg_reward_no_think(GOOD, (1.5, 4.5), 10.0) == {"overall": 0.5, "format": 0.0, "accuracy": 1.0}


def test_distance_variant_penalises_boundary_errors_relative_to_the_duration():
    response = '<think>x</think><answer>{"start_time": "0", "end_time": "4"}</answer>'
    out = tvg_reward_distance(response, (2.0, 4.0), 10.0)
    assert out["accuracy"] == pytest.approx(0.5 * (1 - 2 / 10) * 1.0)
    assert tvg_reward_distance(GOOD, (1.5, 4.5), 10.0)["overall"] == 1.0


def test_timer1_reward_on_hand_computed_values():
    from megatron_tr1.rewards import tvg_reward_timer1
    from megatron_tr1.rl.guards import safe_reward

    assert REWARDS["tvg_timer1"] is tvg_reward_timer1
    # gt 2-6 s of a 10 s video, answer 3-7 s: IoU 3/5, boundary factors (1 - 1/10) each
    response = '<think>x</think><answer>{"start_time": "3", "end_time": "7"}</answer>'
    out = tvg_reward_timer1(response, (2.0, 6.0), 10.0)
    assert out["accuracy"] == pytest.approx(0.6 * 0.9 * 0.9) and out["format"] == 1.0
    assert out["overall"] == pytest.approx(0.5 * 0.486 + 0.5)
    # the same span in a 40 s video: boundary errors are smaller relative to T
    assert tvg_reward_timer1(response, (2.0, 6.0), 40.0)["accuracy"] == pytest.approx(0.6 * 0.975 * 0.975)
    # no think block: format 0, accuracy unchanged; weight 0.1
    bare = '<answer>{"start_time": "3", "end_time": "7"}</answer>'
    assert tvg_reward_timer1(bare, (2.0, 6.0), 10.0, format_weight=0.1) == pytest.approx(
        {"overall": 0.9 * 0.486, "format": 0.0, "accuracy": 0.486})
    # an answer reaching 15 s before a 10 s video: start factor 1 - 15/10 < 0, floored at 0
    early = '<think>x</think><answer>{"start_time": "-15", "end_time": "1"}</answer>'
    assert tvg_reward_timer1(early, (0.0, 2.0), 10.0)["accuracy"] == 0.0
    assert tvg_reward_timer1(GOOD, (1.5, 4.5), 10.0) == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}
    assert tvg_reward_timer1("no answer", (1.5, 4.5), 10.0)["overall"] == 0.0
    with pytest.raises(ValueError, match="tvg_timer1 needs the video's duration"):
        tvg_reward_timer1(GOOD, (1.5, 4.5), None)
    assert safe_reward(tvg_reward_timer1, GOOD, (1.5, 4.5), 0.0)[1]  # counted as failed, scored 0


def test_registry_names_callables_with_the_common_signature():
    assert {"tvg", "tvg_no_think"} <= set(REWARDS)
    for name, fn in REWARDS.items():  # each with its task's ground truth: a span, or an option letter
        out = fn(GOOD, "B" if name.startswith("videoqa_mc") else (1.5, 4.5), 10.0)
        assert set(out) == {"overall", "format", "accuracy"}
