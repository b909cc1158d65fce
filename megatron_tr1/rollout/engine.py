"""The rollout engine interface, the sampling and response types, and the positions every engine samples at.

An engine implements ``generate(prompts, n, sampling) -> [[Response] * n] * len(prompts)`` (prompts are
``data.prompt.RolloutPrompt``) and ``update_weights(named_tensors)`` (HF on-disk names, as ``convert.mapping``
yields them), plus ``sleep`` / ``wake_up`` to hand accelerator memory to training. ``VLLMEngine``
(``vllm_engine.py``) is the fast one; ``HFEngine`` (``hf_engine.py``) runs anywhere torch does; ``factory.make_engine``
picks one by name. Nothing here imports an engine.

Positions: the prompt sits at ``get_rope_index``'s M-RoPE positions and response token ``k`` at
``last_prompt_position + 1 + k`` on all three axes: what ``get_rope_index`` gives the trainer for the whole
prompt + response. vLLM's own positions follow the same rule but can put a video's temporal id one off
(``vllm_worker.trainer_mrope_positions``), and HF ``generate`` uses transformers 5.x's, which differ after a
video (``rope_index``). Both engines here use the trainer's positions, so the log-probs they return are the
ones it recomputes.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Sequence

import torch

from megatron_tr1.data.prompt import RolloutPrompt
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.positions import get_rope_index

STOP_TOKEN = "<|im_end|>"
ENGINES = ("hf", "vllm")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature=0`` is greedy. ``seed`` makes a call reproducible (prompt ``i`` uses
    ``seed + i`` unless ``generate`` is given each prompt's seed). Generation stops at ``<|im_end|>`` (kept as
    the last token) or after ``max_tokens``."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.max_tokens < 1:
            raise ConfigError(f"rollout.max_tokens={self.max_tokens} must be >= 1")


@dataclasses.dataclass
class Response:
    """One sample: token ids (ending with ``<|im_end|>`` when it stopped there), its text without special
    tokens, the log-prob of each token under ``softmax(logits / temperature)`` (raw logits when greedy), and
    ``finish_reason`` "stop" or "length"."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def prompt_positions(hf_config, prompt: RolloutPrompt) -> torch.Tensor:
    """M-RoPE positions ``[3, len(input_ids)]`` of the prompt (``get_rope_index``, as the trainer computes)."""
    ids = torch.tensor([prompt.input_ids])
    if prompt.video is None:
        return get_rope_index(hf_config, ids)[:, 0]
    return get_rope_index(hf_config, ids, video_grid_thw=prompt.video.video_grid_thw,
                          second_per_grid_ts=torch.tensor([prompt.video.second_per_grid_ts]))[:, 0]


def prompt_seeds(prompts: Sequence, sampling: Sampling, seeds: Sequence[int] | None) -> list[int | None]:
    """Each prompt's seed: ``seeds``, else ``sampling.seed + i``, else None (unseeded)."""
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        return list(seeds)
    return [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]


def stop_token_id(tokenizer) -> int:
    """The id of ``<|im_end|>`` (ConfigError when the tokenizer lacks it)."""
    token_id = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer has no {STOP_TOKEN} token; use a Qwen2.5-VL tokenizer")
    return token_id


class RolloutEngine(abc.ABC):
    """Samples responses from the current policy weights."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[list[Response]]:
        """``n`` responses for each prompt, in prompt order. Prompt ``i``'s samples are seeded by ``seeds[i]``
        (default ``sampling.seed + i``; unseeded when ``sampling.seed`` is None and no ``seeds``): the same seed
        gives the same samples whatever else is in the call."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named full tensors (a stream, consumed once); returns the number of tensors loaded."""

    def sleep(self) -> None:
        """Free accelerator memory for training (no-op where there is nothing to free)."""

    def wake_up(self) -> None:
        """Undo ``sleep`` before the next ``update_weights`` / ``generate``."""
