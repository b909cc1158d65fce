"""A mixed grounding + VideoQA GRPO step: each sample its task's prompt, each group its task's reward, the
step's reward metrics per task (``reward/<task>/...``)."""
import pytest

from megatron_tr1.data.prompt import SYSTEM_PROMPT_THINK
from megatron_tr1.data.videoqa import SYSTEM_PROMPT_MC_THINK
from megatron_tr1.rewards import videoqa_mc_reward
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.grpo import score
from megatron_tr1.rl.prompts import GroundingPrompt
from megatron_tr1.rl.stats import task_reward_stats
from megatron_tr1.rollout.engine import Response


def _response(text):
    return Response(token_ids=[1], text=text, logprobs=[0.0], finish_reason="stop")


def test_each_group_is_scored_by_its_tasks_reward():
    def grounding(response, gt, duration, format_weight=0.5):
        return {"overall": 7.0, "format": 0.0, "accuracy": 7.0}

    mc = GroundingPrompt(prompt=None, gt="B", duration=None, query="q", task="videoqa_mc", reward="videoqa_mc")
    tvg = GroundingPrompt(prompt=None, gt=(1.0, 2.0), duration=4.0, query="q")
    texts = ["<think>t</think><answer>B</answer>", "<answer>A</answer>"]
    cfg = TrainConfig()
    assert score(mc, [_response(t) for t in texts], grounding, cfg).rewards == \
        [videoqa_mc_reward(t, "B", None, cfg.algorithm.format_weight) for t in texts]
    assert [r["overall"] for r in score(tvg, [_response(t) for t in texts], grounding, cfg).rewards] == [7.0, 7.0]
    stats = task_reward_stats([("videoqa_mc", [{"overall": 1.0, "format": 1.0, "accuracy": 1.0}] * 2),
                               ("temporal_grounding", [{"overall": 0.5, "format": 0.0, "accuracy": 1.0}]),
                               ("videoqa_mc", [{"overall": 0.0, "format": 0.0, "accuracy": 0.0}] * 2)])
    assert stats == {"reward/videoqa_mc/mean": 0.5, "reward/videoqa_mc/format": 0.5, "reward/videoqa_mc/accuracy": 0.5,
                     "reward/videoqa_mc/groups": 2, "reward/temporal_grounding/mean": 0.5,
                     "reward/temporal_grounding/format": 0.0, "reward/temporal_grounding/accuracy": 1.0,
                     "reward/temporal_grounding/groups": 1}


@pytest.mark.slow
def test_mixed_grpo_step_on_the_tiny_model():
    from megatron_tr1.launch import run_ranks
    from tests.tasks import _mixed_cases

    out = run_ranks(_mixed_cases.mixed_grpo_case, 1)[0]
    assert out["tasks"] == ["temporal_grounding"] * 2 + ["videoqa_mc"] * 2
    assert out["rewards"] == [None, None, "videoqa_mc", "videoqa_mc"] and out["gts"][2:] == ["A", "B"]
    assert all(SYSTEM_PROMPT_THINK in p for p in out["prompts"][:2])
    assert all(SYSTEM_PROMPT_MC_THINK in p and "(D)" in p for p in out["prompts"][2:])
    m = out["metrics"]
    assert m["reward/temporal_grounding/groups"] == 2 and m["reward/videoqa_mc/groups"] == 2
    assert m["reward/temporal_grounding/mean"] > 0  # the length reward the step was given, for grounding only
    assert m["reward/videoqa_mc/mean"] == pytest.approx(0.5 * m["reward/videoqa_mc/accuracy"]
                                                        + 0.5 * m["reward/videoqa_mc/format"])
    assert m["reward/mean"] == pytest.approx((m["reward/temporal_grounding/mean"] + m["reward/videoqa_mc/mean"]) / 2)
    assert m["grad_norm"] > 0


def test_mixed_grounding_and_videoqa_grpo_run_logs_rewards_per_task(tmp_path):
    """A whole ``tr1 train`` GRPO stage on mixed data: every step logs each task's reward, the groups of both tasks
    add up to the step's prompts, and the run evaluates as usual."""
    from megatron_tr1.launch import run_ranks
    from tests.tasks import _mixed_cases

    out = run_ranks(_mixed_cases.mixed_run_case, 1, str(tmp_path))[0]
    records = out["records"]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["reward/temporal_grounding/groups"] + r["reward/videoqa_mc/groups"] == 4
        for task in ("temporal_grounding", "videoqa_mc"):
            assert {f"reward/{task}/{k}" for k in ("mean", "format", "accuracy")} <= r.keys()
    assert sum(r["reward/videoqa_mc/groups"] for r in records) > 0
    assert sum(r["reward/temporal_grounding/groups"] for r in records) > 0
    assert out["results"]["grpo"]["n"] == 2  # the grounding test split, evaluated as in a grounding-only run


def test_task_prompts_build_each_sample_in_its_tasks_mode_in_order():
    from megatron_tr1.data.annotations import Sample
    from megatron_tr1.rl.prompts import task_prompts
    from megatron_tr1.tasks import get_task

    class Cache:
        def prompts_or_skip(self, samples, mode):
            return [(s.id, mode) for s in samples]

    samples = [Sample("v", "q", 0.0, 1.0, 2.0, "d", str(i), task="videoqa_mc" if i % 2 else "temporal_grounding",
                      answer="A" if i % 2 else None, problem="Q?\n(A) x") for i in range(4)]
    for think in (True, False):
        out = task_prompts(Cache(), samples, think)
        assert [i for i, _ in out] == ["0", "1", "2", "3"]
        assert [m for _, m in out] == [think, get_task("videoqa_mc").prompt_mode(think)] * 2
