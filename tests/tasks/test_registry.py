"""The task registry and the videoqa_mc reward."""
import pytest

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.prompt import PromptSpec, build_messages
from megatron_tr1.errors import ConfigError, DataError
from megatron_tr1.rewards import REWARDS, parse_option, tvg_reward, videoqa_mc_reward
from megatron_tr1.tasks import TASKS, get_task, task_for_format

THINK = "<think>the screen turns green halfway</think>\n<answer>{}</answer>"


def _mc(answer="B"):
    return Sample(video="v.mp4", query="Which happens?", start=0.0, end=0.0, duration=None, dataset="d", id="d#0",
                  problem="Which happens?\n(A) x\n(B) y", task="videoqa_mc", answer=answer)


def test_registry_names_both_tasks_and_defaults_by_format():
    assert set(TASKS) == {"temporal_grounding", "videoqa_mc"}
    assert task_for_format("mvbench") == "videoqa_mc"
    assert {task_for_format(f) for f in ("temporal-r1", "lmms-tvg", "charades-sta", "activitynet")} == \
        {"temporal_grounding"}
    with pytest.raises(ConfigError, match="unknown task 'captioning'.*temporal_grounding, videoqa_mc"):
        get_task("captioning", "datasets[0].task")
    for task in TASKS.values():  # every task's rewards are registered
        assert task.reward in REWARDS and task.reward_no_think in REWARDS


def test_temporal_grounding_delegates_to_todays_code():
    task = get_task("temporal_grounding")
    sample = Sample(video="v.mp4", query="q", start=1.0, end=3.0, duration=4.0, dataset="d", id="d#0")
    assert task.prompt_mode(True) is True and task.prompt_mode(False) is False
    assert task.ground_truth(sample) == (1.0, 3.0)
    assert (task.reward_name(True), task.reward_name(False)) == ("tvg", "tvg_no_think")
    response = '<think>t</think><answer>{"start_time": "1.0", "end_time": "3.0"}</answer>'
    assert REWARDS[task.reward](response, task.ground_truth(sample), 4.0) == tvg_reward(response, (1.0, 3.0), 4.0)
    assert task.score([response, "no"], [sample, sample], "answer")["mIoU"] == pytest.approx(50.0)


def test_videoqa_mc_prompt_reward_and_score():
    task = get_task("videoqa_mc")
    think, plain = task.prompt_mode(True), task.prompt_mode(False)
    assert isinstance(think, PromptSpec) and "<think>" in think.system and "<think>" not in plain.system
    messages = build_messages("Which happens?", think, _mc().problem)
    assert messages[0]["content"] == think.system and messages[1]["content"][1]["text"] == _mc().problem
    assert task.ground_truth(_mc()) == "B"
    with pytest.raises(DataError, match="without an answer letter"):
        task.ground_truth(_mc(answer=None))
    assert task.score([THINK.format("B"), THINK.format("A")], [_mc(), _mc()], "answer") == {"n": 2, "accuracy": 50.0}


@pytest.mark.parametrize("response, think, fmt, acc", [
    (THINK.format("B"), True, 1, 1), (THINK.format("(B)"), True, 1, 1), (THINK.format(" B "), True, 1, 1),
    (THINK.format("A"), True, 1, 0),  # well formed, wrong
    ("<answer>B</answer>", True, 0, 1),  # no think block: right, not the think format
    ("<answer>B</answer>", False, 1, 1), (THINK.format("B"), False, 0, 1),  # the no-think format is the answer alone
    (THINK.format("B. y"), True, 0, 0), (THINK.format("b"), True, 0, 0),  # one capital letter only
    (THINK.format("AB"), True, 0, 0), ("B", True, 0, 0), ("", True, 0, 0),
    ("<think>x</think><answer>A</answer> then <answer>B</answer>", True, 0, 1),  # the last answer counts
])
def test_videoqa_mc_reward(response, think, fmt, acc):
    reward = REWARDS["videoqa_mc" if think else "videoqa_mc_no_think"]
    out = reward(response, "B", None, format_weight=0.25)
    assert (out["format"], out["accuracy"]) == (fmt, acc)
    assert out["overall"] == pytest.approx(0.75 * acc + 0.25 * fmt)


def test_videoqa_mc_reward_refuses_a_bad_key():
    assert parse_option("<answer>(C)</answer>") == "C" and parse_option("<answer>C D</answer>") is None
    with pytest.raises(ValueError, match="one option letter"):
        videoqa_mc_reward("<answer>B</answer>", (1.0, 2.0))
