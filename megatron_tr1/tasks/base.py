"""What a task is: how a sample's prompt is built, which reward scores a response, how evaluation scores it.

A ``Task`` holds plain functions; ``megatron_tr1.tasks`` keeps the registry (``TASKS``). The trainer asks a
sample's task (``Sample.task``) for its prompt mode (``data.prompt``: what ``PromptCache`` builds), the reward's
name in ``rewards.REWARDS`` (with or without think) and the ground truth that reward compares against;
evaluation asks it to score responses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from megatron_tr1.data.annotations import Sample


@dataclasses.dataclass(frozen=True)
class Task:
    """One task. ``prompt_mode(think)``: the prompt mode of its samples in a think / answer-only stage;
    ``reward`` / ``reward_no_think``: names in ``rewards.REWARDS``; ``ground_truth(sample)``: what the reward
    compares a response with; ``score(responses, samples, protocol)``: evaluation metrics (percent) of responses
    under an evaluation protocol; ``formats``: the annotation formats whose datasets are this task by default
    (``task: auto``)."""

    name: str
    prompt_mode: Callable[[bool], Any]
    reward: str
    reward_no_think: str
    ground_truth: Callable[[Sample], Any]
    score: Callable[[Sequence[str], Sequence[Sample], str], dict]
    formats: tuple[str, ...] = ()

    def reward_name(self, think: bool) -> str:
        """The reward of a think (True) or answer-only (False) stage."""
        return self.reward if think else self.reward_no_think
