"""Decoded videos kept for reuse: ``PromptCache`` builds the prompts of samples in either prompt mode, decoding each
video once while it is kept (training and evaluation share one).

A video that cannot be decoded (unreadable, truncated, no frames) raises ``DataError`` naming the file; with
training and ``tr1 eval --lenient`` call ``prompts_or_skip``, which leaves such a sample out instead,
remembers the video (never decoded again), warns once per video and counts it per reason (``skipped``).

``sample_prompt`` decodes a sample's frames with a ``data.video.VideoBudget`` (only its ``clip`` where it has one)
and builds its ``RolloutPrompt``; ``prompt_in_mode`` re-encodes only the text of a prompt (another query or mode on
the same frames). Frames are kept per video and clip: two clips of one file are two entries.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Sequence

from megatron_tr1.data.annotations import Sample
from megatron_tr1.data.prompt import RolloutPrompt, build_prompt, encode_prompt, user_text
from megatron_tr1.data.video import sample_frames
from megatron_tr1.errors import DataError

log = logging.getLogger(__name__)


def sample_prompt(sample: Sample, tokenizer, hf_config, video, think: bool | str) -> RolloutPrompt:
    """``sample``'s prompt in the mode ``think`` (``data.prompt``: True, False, "r1", "custom"), its frames
    decoded with the budget ``video`` (``data.video.VideoBudget``)."""
    start, end = sample.clip if sample.clip is not None else (None, None)
    vc = hf_config.vision_config
    frames = sample_frames(sample.video, fps=video.fps, min_frames=video.min_frames, max_frames=video.max_frames,
                           total_pixels=video.total_pixels, min_pixels=video.min_pixels, start=start, end=end,
                           factor=vc.patch_size * vc.spatial_merge_size)
    return build_prompt(tokenizer, hf_config, sample.query, frames, think, sample.problem)


class PromptCache:
    """Prompts of samples in any mode (``data.prompt``: think, answer only, the seed's evaluation prompts),
    decoding each video once while it is kept.

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
        self._videos: OrderedDict[str, dict[tuple, RolloutPrompt]] = OrderedDict()
        self.bad: dict[str, str] = {}  # video -> why it could not be decoded
        self.skipped: collections.Counter = collections.Counter()  # samples left out, per reason

    def __call__(self, samples: Sequence[Sample], think: bool | str) -> list[RolloutPrompt]:
        return [self.get(s, think) for s in samples]

    def prompts_or_skip(self, samples: Sequence[Sample], think: bool | str) -> list[RolloutPrompt | None]:
        """``get`` for each sample, None for one whose video cannot be decoded (warned once per video, counted in
        ``skipped`` per reason)."""
        out = []
        for s in samples:
            try:
                out.append(self.get(s, think))
            except DataError as e:
                reason = ("missing video" if not os.path.exists(s.video) else
                          "clip too short" if s.clip is not None and "the clip" in str(e) else "undecodable video")
                if _video_key(s) not in self.bad:
                    log.warning("skipping sample %s: %s", s.id, e)
                self.bad[_video_key(s)] = str(e)
                self.skipped[reason] += 1
                out.append(None)
        return out

    def get(self, sample: Sample, think: bool | str) -> RolloutPrompt:
        key = (user_text(sample.query, think, sample.problem), think)
        origin = (str(sample.video), sample.query, think, sample.problem, sample.clip)
        video = _video_key(sample)
        if video in self.bad:
            raise DataError(self.bad[video])
        prompts = self._videos.get(video)
        if prompts is None:
            prompt = sample_prompt(sample, self.tokenizer, self.hf_config, self.video, think)
            prompt = dataclasses.replace(prompt, key=origin)
            self.decodes += 1
            self._keep(video, key, prompt)
            return prompt
        self._videos.move_to_end(video)
        if key not in prompts:
            prompts[key] = dataclasses.replace(
                prompt_in_mode(next(iter(prompts.values())), sample.query, self.tokenizer, think, sample.problem,
                               self.hf_config),
                key=origin)
        return prompts[key]

    def from_key(self, key: tuple) -> RolloutPrompt:
        """The prompt a ``RolloutPrompt.key`` names (``(video, query, think, problem, clip)``), built here as ``get``
        builds it."""
        video, query, think, problem, clip = key
        return self.get(Sample(video=video, query=query, start=0.0, end=0.0, duration=None, dataset="",
                               id=f"{video}#{query}", problem=problem, clip=clip), think)

    def _keep(self, video: str, key: tuple, prompt: RolloutPrompt) -> None:
        size = _nbytes(prompt)
        if size > self.max_bytes:  # never kept: keep what is there
            return
        while self.nbytes + size > self.max_bytes:
            _, old = self._videos.popitem(last=False)
            self.nbytes -= _nbytes(next(iter(old.values())))  # a video's prompts share its patches and frames
        self._videos[video] = {key: prompt}
        self.nbytes += size


def _video_key(sample: Sample) -> str:
    """Where a sample's frames are kept: its video, and its clip where it has one."""
    return str(sample.video) if sample.clip is None else f"{sample.video}@{sample.clip[0]:g}-{sample.clip[1]:g}s"


def _nbytes(prompt: RolloutPrompt) -> int:
    """Host memory of a prompt's video: its patches and the decoded frames (vLLM's input)."""
    tensors = [prompt.video.pixel_values_videos] + ([prompt.frames.frames] if prompt.frames is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def prompt_in_mode(prompt: RolloutPrompt, query: str, tokenizer, think: bool | str,
                   problem: str | None = None, hf_config=None) -> RolloutPrompt:
    """``prompt``'s frames and patches with the text of ``query`` (or ``problem``) in the mode ``think``, the video
    expanded for ``hf_config``'s family."""
    ids = encode_prompt(tokenizer, query, prompt.video, think, problem, hf_config)["input_ids"][0].tolist()
    return dataclasses.replace(prompt, input_ids=ids)
