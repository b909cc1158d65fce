"""``temporal_grounding`` (Temporal-R1): find when a described event happens; today's code, by delegation.

Prompt: ``data.prompt``'s training modes (think or answer only); reward: ``rewards.tvg_reward`` (IoU + format) or
its no-think variant; evaluation: ``eval.protocols.score_responses`` (mIoU, R@0.3/0.5/0.7 under the seed's
``custom`` / ``r1`` protocols or ours, ``answer``).
"""
from __future__ import annotations

from typing import Sequence

from megatron_tr1.data.annotations import FORMATS, Sample
from megatron_tr1.eval.protocols import score_responses
from megatron_tr1.tasks.base import Task


def _score(responses: Sequence[str], samples: Sequence[Sample], protocol: str = "answer") -> dict:
    return score_responses(list(responses), [s.gt for s in samples], protocol)


TASK = Task(name="temporal_grounding", prompt_mode=bool, reward="tvg", reward_no_think="tvg_no_think",
            ground_truth=lambda sample: sample.gt, score=_score, formats=FORMATS)
