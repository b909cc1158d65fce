"""``videoqa_mc``: multiple-choice VideoQA (MVBench's layout, the synthetic ``mc_*`` splits).

Prompt: the question and lettered options (``data.videoqa.mc_user_text``, the sample's ``problem``) under a system
prompt asking for the option letter in ``<answer>`` tags, with or without think (``data.prompt.PromptSpec``);
reward: ``rewards.videoqa_mc_reward`` (accuracy: the letter is right; format: think + answer tags around one
letter; ``overall = (1 - w) * accuracy + w * format``) or its no-think variant; ground truth: the option letter
(``Sample.answer``); evaluation: ``eval.mvbench`` (``custom`` / ``r1``: lmms-eval's MVBench reading; ``answer``:
ours, the strict letter), accuracy in percent.
"""
from __future__ import annotations

from typing import Sequence

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.videoqa import FORMAT
from megatron_tr1.errors import DataError
from megatron_tr1.eval.mvbench import is_correct, prompt_mode
from megatron_tr1.tasks.base import Task


def _letter(sample: Sample) -> str:
    if not sample.answer:
        raise DataError(f"sample {sample.id} ({sample.video}) is a videoqa_mc sample without an answer letter")
    return sample.answer


def _score(responses: Sequence[str], samples: Sequence[Sample], protocol: str = "answer") -> dict:
    if len(responses) != len(samples):
        raise ValueError(f"videoqa_mc score: {len(responses)} responses for {len(samples)} samples")
    right = sum(is_correct(r, _letter(s), protocol)[0] for r, s in zip(responses, samples))
    return {"n": len(samples), "accuracy": 100.0 * right / len(samples) if samples else 0.0}


TASK = Task(name="videoqa_mc", prompt_mode=lambda think: prompt_mode("answer", think), reward="videoqa_mc",
            reward_no_think="videoqa_mc_no_think", ground_truth=_letter, score=_score, formats=(FORMAT,))
