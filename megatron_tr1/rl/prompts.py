"""What the policy sees: grounding prompts from samples, and model micro-batches of prompt + response.

``grounding_prompt`` turns a ``data.annotations.Sample`` into a ``GroundingPrompt`` (sample_frames ->
``rollout.engine.build_prompt``, plus the ground truth the reward needs); ``PromptCache`` keeps decoded videos
(bounded) so that the trainer and the evaluator decode each once. ``model_batch`` turns sequences
(``TokenSequence``, ``rl.batching``) and the prompt each came from into the right-padded tensors of one
``forward_logprobs`` call: ids, labels, M-RoPE positions (``get_rope_index``, as the engines use) and the
videos of the rows, concatenated in row order. GRPO and SFT both build their micro-batches here.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Sequence

import torch

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.video import sample_frames
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_tr1.rl.batching import TokenSequence, pad_batch
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rollout.engine import RolloutPrompt, build_prompt


@dataclasses.dataclass
class GroundingPrompt:
    """A rollout prompt and what the reward compares against: ``gt`` (start, end) seconds, ``duration``."""

    prompt: RolloutPrompt
    gt: tuple[float, float]
    duration: float | None
    query: str


def sample_prompt(sample: Sample, tokenizer, hf_config, video, think: bool) -> RolloutPrompt:
    """``sample``'s prompt, its frames decoded with the budget ``video`` (``rl.config.VideoBudget``)."""
    frames = sample_frames(sample.video, fps=video.fps, min_frames=video.min_frames, max_frames=video.max_frames,
                           total_pixels=video.total_pixels, min_pixels=video.min_pixels)
    return build_prompt(tokenizer, hf_config, sample.query, frames, think)


class PromptCache:
    """Prompts of samples in either mode (think / answer only), decoding each video once while it is kept.

    A video's frames are decoded on its first prompt; every other prompt on it (the other mode, another query on
    the same video, as Charades-STA has ~2.3 per video) re-encodes only the text and shares the patches. Videos
    beyond ``max_gb`` (``data.cache_gb``) go least recently used first; ``max_gb=0`` keeps none. At 2048 visual
    tokens a video is ~48 MB (fp32 patches, uint8 frames): a whole Charades split would not fit in host memory.
    """

    def __init__(self, tokenizer, hf_config, video, max_gb: float = 8.0):
        self.tokenizer, self.hf_config, self.video = tokenizer, hf_config, video
        self.max_bytes = int(max_gb * 2**30)
        self.nbytes = 0
        self.decodes = 0  # videos decoded so far (a revisit after eviction decodes again)
        self._videos: OrderedDict[str, dict[tuple[str, bool], RolloutPrompt]] = OrderedDict()

    def __call__(self, samples: Sequence[Sample], think: bool) -> list[RolloutPrompt]:
        return [self.get(s, think) for s in samples]

    def get(self, sample: Sample, think: bool) -> RolloutPrompt:
        key = (sample.query, think)
        prompts = self._videos.get(str(sample.video))
        if prompts is None:
            prompt = sample_prompt(sample, self.tokenizer, self.hf_config, self.video, think)
            self.decodes += 1
            self._keep(str(sample.video), key, prompt)
            return prompt
        self._videos.move_to_end(str(sample.video))
        if key not in prompts:
            prompts[key] = prompt_in_mode(next(iter(prompts.values())), sample.query, self.tokenizer, think)
        return prompts[key]

    def _keep(self, video: str, key: tuple[str, bool], prompt: RolloutPrompt) -> None:
        size = _nbytes(prompt)
        if size > self.max_bytes:  # never kept: keep what is there
            return
        while self.nbytes + size > self.max_bytes:
            _, old = self._videos.popitem(last=False)
            self.nbytes -= _nbytes(next(iter(old.values())))  # a video's prompts share its patches and frames
        self._videos[video] = {key: prompt}
        self.nbytes += size


def _nbytes(prompt: RolloutPrompt) -> int:
    """Host memory of a prompt's video: its patches and the decoded frames (vLLM's input)."""
    tensors = [prompt.video.pixel_values_videos] + ([prompt.frames.frames] if prompt.frames is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def grounding_item(sample: Sample, prompt: RolloutPrompt, max_prompt_tokens: int) -> GroundingPrompt:
    """``prompt`` with ``sample``'s ground truth; ConfigError when it is longer than ``max_prompt_tokens``."""
    if len(prompt.input_ids) > max_prompt_tokens:
        raise ConfigError(f"the prompt of sample {sample.id} has {len(prompt.input_ids)} tokens, more than "
                          f"data.max_prompt_tokens={max_prompt_tokens}; raise it or lower "
                          f"data.video.total_pixels / max_frames")
    return GroundingPrompt(prompt=prompt, gt=sample.gt, duration=sample.duration, query=sample.query)


def grounding_prompt(sample: Sample, cfg: TrainConfig, tokenizer, hf_config, think: bool | None = None
                     ) -> GroundingPrompt:
    """Decode ``sample``'s frames with ``cfg.data.video``'s budget and build its prompt (``think`` defaults
    to ``cfg.algorithm.think``). ConfigError when it is longer than ``data.max_prompt_tokens``."""
    prompt = sample_prompt(sample, tokenizer, hf_config, cfg.data.video,
                           cfg.algorithm.think if think is None else think)
    return grounding_item(sample, prompt, cfg.data.max_prompt_tokens)


def prompt_in_mode(prompt: RolloutPrompt, query: str, tokenizer, think: bool) -> RolloutPrompt:
    """``prompt``'s frames and patches with the text of ``query`` in the ``think`` (or answer-only) mode."""
    from megatron_tr1.data.prompt import encode_prompt

    ids = encode_prompt(tokenizer, query, prompt.video, think)["input_ids"][0].tolist()
    return dataclasses.replace(prompt, input_ids=ids)


def model_batch(seqs: Sequence[TokenSequence], prompts: Sequence[RolloutPrompt], hf_config,
                pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One padded micro-batch for ``forward_logprobs``: ``input_ids``, ``labels``, ``loss_mask``,
    ``attention_mask`` ``[B, L]``, ``position_ids`` ``[3, B, L]``, ``pixel_values_videos`` and
    ``video_grid_thw`` (row ``i``'s video is ``prompts[i].video``; every prompt must have one)."""
    if len(seqs) != len(prompts) or any(p.video is None for p in prompts):
        raise ValueError(f"model_batch needs one video prompt per sequence, got {len(seqs)} sequences and "
                         f"{sum(p.video is not None for p in prompts)} video prompts of {len(prompts)}")
    batch = pad_batch(seqs, pad_id)
    videos = [p.video for p in prompts]
    grid = torch.cat([v.video_grid_thw for v in videos])
    batch["position_ids"] = get_rope_index(
        hf_config, batch["input_ids"], attention_mask=batch["attention_mask"], video_grid_thw=grid,
        second_per_grid_ts=torch.tensor([v.second_per_grid_ts for v in videos]))
    batch["pixel_values_videos"] = torch.cat([v.pixel_values_videos for v in videos])
    batch["video_grid_thw"] = grid
    return batch


def policy_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, return_entropy: bool = False):
    """``model.forward_logprobs`` on a ``model_batch`` (log-probs ``[B, L]``, and the entropy if asked)."""
    return model.forward_logprobs(batch["input_ids"], batch["position_ids"], batch["labels"],
                                  pixel_values_videos=batch["pixel_values_videos"],
                                  video_grid_thw=batch["video_grid_thw"], temperature=temperature,
                                  return_entropy=return_entropy, attention_mask=batch["attention_mask"])
