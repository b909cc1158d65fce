"""The Temporal-R1 prompt: chat messages, and token ids with the video placeholder expanded.

``encode_prompt`` renders the tokenizer's chat template (Qwen2.5-VL's, generation prompt appended) and
expands its single ``<|video_pad|>`` to ``num_video_tokens`` copies, as ``Qwen2_5_VLProcessor`` does,
before tokenising. ``prompt_text`` keeps the single placeholder: vLLM expands it itself. ``build_prompt`` makes
the ``RolloutPrompt`` every engine and the trainer take: the ids, the video's patches and its decoded frames.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_tr1.data.processor import VideoInputs, preprocess_video
from megatron_tr1.data.video import VideoFrames
from megatron_tr1.errors import DataError

SYSTEM_PROMPT_THINK = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
    "<answer> </answer> tags. Output the final answer in JSON format."
)
# "GRPO without think": same style, no reasoning, and the answer's JSON spelled out.
SYSTEM_PROMPT_NO_THINK = (
    "You provide ONLY the final answer, without any reasoning process. The final answer MUST BE put in "
    '<answer> </answer> tags. Output the final answer in JSON format: '
    '<answer>{"start_time": "...", "end_time": "..."}</answer>, times in seconds.'
)
QUERY_TEMPLATE = 'Give the query: "{query}", when does the described content occur in the video?.'
VIDEO_TOKEN = "<|video_pad|>"


def system_prompt(think: bool = True) -> str:
    return SYSTEM_PROMPT_THINK if think else SYSTEM_PROMPT_NO_THINK


def build_messages(query: str, think: bool = True) -> list[dict]:
    """HF chat messages: the system prompt, then a user turn of [video, question text]."""
    if "<|" in query:
        raise DataError(f"query {query!r} contains '<|', which would inject a special token into the prompt")
    return [
        {"role": "system", "content": system_prompt(think)},
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "text", "text": QUERY_TEMPLATE.format(query=query)}],
        },
    ]


def encode_prompt(tokenizer, query: str, video_inputs: VideoInputs, think: bool = True) -> dict:
    """``{"input_ids": LongTensor [1, L], "prompt_text": str}`` for one video and query."""
    messages = build_messages(query, think)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if (count := prompt_text.count(VIDEO_TOKEN)) != 1:
        raise DataError(f"the tokenizer's chat template wrote {VIDEO_TOKEN} {count} times, expected once")
    expanded = prompt_text.replace(VIDEO_TOKEN, VIDEO_TOKEN * video_inputs.num_video_tokens)
    ids = tokenizer(expanded, add_special_tokens=True)["input_ids"]
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "prompt_text": prompt_text}


@dataclasses.dataclass
class RolloutPrompt:
    """One prompt. ``input_ids``: token ids with the video placeholder expanded (one ``<|video_pad|>`` per
    visual token, as the trainer sees them). ``video``: its patches (HF engine, positions). ``frames``: the
    decoded frames the patches came from (vLLM patchifies them itself; no second decode). ``key``: where it
    comes from, ``(video path, query, think)``, so another rank can build the same prompt (``PromptCache`` sets it)."""

    input_ids: list[int]
    video: VideoInputs | None = None
    frames: VideoFrames | None = None
    key: tuple | None = None


def build_prompt(tokenizer, hf_config, query: str, frames: VideoFrames, think: bool = True) -> RolloutPrompt:
    """The Temporal-R1 prompt for ``query`` about the sampled ``frames``, patchified for ``hf_config``."""
    vc = hf_config.vision_config
    video = preprocess_video(frames.frames.cpu(), frames.sample_fps, patch_size=vc.patch_size,
                             temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size)
    ids = encode_prompt(tokenizer, query, video, think)["input_ids"][0].tolist()
    return RolloutPrompt(input_ids=ids, video=video, frames=frames)
