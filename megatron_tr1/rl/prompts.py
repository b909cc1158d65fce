"""What the policy sees: grounding prompts from samples, and model micro-batches of prompt + response.

``grounding_prompt`` turns a ``data.annotations.Sample`` into a ``GroundingPrompt`` (``data.prompt_cache.sample_prompt``
plus the ground truth the reward needs); the trainer takes its prompts from a ``data.prompt_cache.PromptCache``
(decoded videos kept, bounded, so the trainer and the evaluator decode each once). ``model_batch`` turns sequences
(``TokenSequence``, ``rl.batching``) and the prompt each came from into the right-padded tensors of one
``forward_logprobs`` call: ids, labels, M-RoPE positions (``get_rope_index``, as the engines use) and the
videos of the rows, concatenated in row order. GRPO and SFT both build their micro-batches here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.prompt import RolloutPrompt
from megatron_tr1.data.prompt_cache import sample_prompt
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.positions import get_rope_index
from megatron_tr1.rl.batching import TokenSequence, pack_batch, pad_batch, unpack
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.tasks import DEFAULT, get_task


@dataclasses.dataclass
class GroundingPrompt:
    """A rollout prompt and what the reward compares against: ``gt`` (grounding: (start, end) seconds; other tasks:
    their ``Task.ground_truth``, e.g. the option letter), ``duration``; ``task``: the sample's task; ``reward``: the
    ``rewards.REWARDS`` name that scores it, None for temporal_grounding (the stage's ``algorithm.reward`` /
    ``reward_no_think``)."""

    prompt: RolloutPrompt
    gt: Any
    duration: float | None
    query: str
    task: str = DEFAULT
    reward: str | None = None


def task_prompts(cache, samples: Sequence[Sample], think: bool) -> list[RolloutPrompt | None]:
    """``cache.prompts_or_skip`` of ``samples`` in order, each in its task's prompt mode for a ``think`` stage."""
    out: list[RolloutPrompt | None] = [None] * len(samples)
    for name in dict.fromkeys(s.task for s in samples):
        idx = [i for i, s in enumerate(samples) if s.task == name]
        mode = get_task(name, f"sample {samples[idx[0]].id}").prompt_mode(think)
        for i, prompt in zip(idx, cache.prompts_or_skip([samples[i] for i in idx], mode)):
            out[i] = prompt
    return out


def grounding_item(sample: Sample, prompt: RolloutPrompt, max_prompt_tokens: int,
                   think: bool = True) -> GroundingPrompt:
    """``prompt`` with ``sample``'s ground truth (and, for a task other than grounding, its reward in a ``think``
    stage); ConfigError when it is longer than ``max_prompt_tokens``."""
    if len(prompt.input_ids) > max_prompt_tokens:
        raise ConfigError(f"the prompt of sample {sample.id} has {len(prompt.input_ids)} tokens, more than "
                          f"data.max_prompt_tokens={max_prompt_tokens}; raise it or lower "
                          f"data.video.total_pixels / max_frames")
    task = get_task(sample.task, f"sample {sample.id}")
    return GroundingPrompt(prompt=prompt, gt=task.ground_truth(sample), duration=sample.duration, query=sample.query,
                           task=task.name, reward=None if task.name == DEFAULT else task.reward_name(bool(think)))


def grounding_prompt(sample: Sample, cfg: TrainConfig, tokenizer, hf_config, think: bool | None = None
                     ) -> GroundingPrompt:
    """Decode ``sample``'s frames with ``cfg.data.video``'s budget and build its prompt (``think`` defaults
    to ``cfg.algorithm.think``). ConfigError when it is longer than ``data.max_prompt_tokens``."""
    think = cfg.algorithm.think if think is None else think
    prompt = sample_prompt(sample, tokenizer, hf_config, cfg.data.video, get_task(sample.task).prompt_mode(think))
    return grounding_item(sample, prompt, cfg.data.max_prompt_tokens, think)


def model_batch(seqs: Sequence[TokenSequence], prompts: Sequence[RolloutPrompt], hf_config,
                pad_id: int = 0, packed: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch for ``forward_logprobs``: ``labels``, ``loss_mask``, ``attention_mask``, ``lengths``,
    ``prompt_lengths`` in the padded layout ``[B, L]`` (what losses and statistics read), and the model's inputs:
    ``input_ids`` and ``position_ids`` (``[3, B, L]``, ``get_rope_index``, as the engines use) padded, or with
    ``packed`` one row ``[1, T]`` (``input_ids``, ``packed_labels``, ``position_ids`` ``[3, 1, T]`` restarting in each
    sequence, ``cu_seqlens``); plus ``pixel_values_videos`` and ``video_grid_thw`` of the rows, concatenated in row
    order (row ``i``'s video is ``prompts[i].video``; every prompt must have one) and ``width`` (``L``)."""
    if len(seqs) != len(prompts) or any(p.video is None for p in prompts):
        raise ValueError(f"model_batch needs one video prompt per sequence, got {len(seqs)} sequences and "
                         f"{sum(p.video is not None for p in prompts)} video prompts of {len(prompts)}")
    batch = pad_batch(seqs, pad_id)
    videos = [p.video for p in prompts]
    grid = torch.cat([v.video_grid_thw for v in videos])
    seconds = torch.tensor([v.second_per_grid_ts for v in videos])
    if packed:
        row = pack_batch(seqs)
        batch.update(input_ids=row["input_ids"], packed_labels=row["labels"], cu_seqlens=row["cu_seqlens"])
        batch["position_ids"] = torch.cat([
            get_rope_index(hf_config, torch.tensor([s.prompt_ids + s.response_ids]), video_grid_thw=grid[i:i + 1],
                           second_per_grid_ts=seconds[i:i + 1])[:, 0] for i, s in enumerate(seqs)], dim=1)[:, None]
    else:
        batch["position_ids"] = get_rope_index(hf_config, batch["input_ids"], attention_mask=batch["attention_mask"],
                                               video_grid_thw=grid, second_per_grid_ts=seconds)
    batch["pixel_values_videos"] = torch.cat([v.pixel_values_videos for v in videos])
    batch["video_grid_thw"] = grid
    batch["width"] = batch["labels"].shape[1]
    return batch


def policy_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, return_entropy: bool = False):
    """The model's ``forward_logprobs`` on a ``model_batch`` (log-probs ``[B, L]``, and the entropy if asked; a
    packed batch's are laid back out as ``[B, L]``). Pipeline stages before the last return their hidden states."""
    if "cu_seqlens" not in batch:
        return model.forward_logprobs(batch["input_ids"], batch["position_ids"], batch["labels"],
                                      pixel_values_videos=batch["pixel_values_videos"],
                                      video_grid_thw=batch["video_grid_thw"], temperature=temperature,
                                      return_entropy=return_entropy, attention_mask=batch["attention_mask"])
    out = model.forward_logprobs(batch["input_ids"], batch["position_ids"], batch["packed_labels"],
                                 pixel_values_videos=batch["pixel_values_videos"],
                                 video_grid_thw=batch["video_grid_thw"], temperature=temperature,
                                 return_entropy=return_entropy, cu_seqlens=batch["cu_seqlens"])
    if not getattr(model, "post_process", True):
        return out
    if return_entropy:
        return tuple(unpack(x, batch["cu_seqlens"], batch["width"]) for x in out)
    return unpack(out, batch["cu_seqlens"], batch["width"])
