"""The Temporal-R1 prompt: chat messages, and token ids with the video placeholder expanded.

``encode_prompt`` renders the tokenizer's chat template (Qwen2.5-VL's, generation prompt appended) and
expands its single ``<|video_pad|>`` to ``num_video_tokens`` copies, as ``Qwen2_5_VLProcessor`` does,
before tokenising. ``prompt_text`` keeps the single placeholder: vLLM expands it itself. ``build_prompt`` makes
the ``RolloutPrompt`` every engine and the trainer take: the ids, the video's patches and its decoded frames.

**Prompt modes** (the ``think`` argument): ``True`` / ``False`` are the training prompts with and without think
(system prompt, then the user text: the annotation's ``problem`` verbatim where it has one, else ``QUERY_TEMPLATE``
around the query); ``"r1"`` and ``"custom"`` are the seed's evaluation prompts (lmms-eval's user text
``eval_text(caption)``; system prompt: think for R1 inference, "You are a helpful assistant." for custom inference).
A ``PromptSpec(system)`` is a mode given outright (other tasks, ``megatron_tr1.tasks``): that system prompt, the
sample's ``problem`` as the user text.
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
# lmms-eval's qwen2_5_vl model class (the seed's "custom inference"); also Qwen2.5-VL's default system prompt
SYSTEM_PROMPT_PLAIN = "You are a helpful assistant."
QUERY_TEMPLATE = 'Give the query: "{query}", when does the described content occur in the video?.'
# lmms-eval's temporal_grounding task: pre_prompt + caption + ". " + post_prompt
EVAL_PRE_PROMPT = 'Give the query: "'
EVAL_POST_PROMPT = '", when does the described content occur in the video?.'
PROMPT_MODES = (True, False, "r1", "custom")
VIDEO_TOKEN = "<|video_pad|>"


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A prompt mode given outright, for tasks other than grounding (``megatron_tr1.tasks``): ``system`` is the
    system prompt and the sample's ``problem`` the user text, verbatim. Hashable, so it keys caches like the
    other modes."""

    system: str


def _check_mode(think) -> None:
    if isinstance(think, PromptSpec):
        return
    if not any(think is m or (isinstance(think, str) and think == m) for m in PROMPT_MODES):
        raise ValueError(f"prompt mode {think!r} is not one of True, False, 'r1', 'custom'")


def system_prompt(think: bool | str = True) -> str:
    """The system prompt of a prompt mode (see the module docstring)."""
    _check_mode(think)
    if isinstance(think, PromptSpec):
        return think.system
    if think == "custom":
        return SYSTEM_PROMPT_PLAIN
    return SYSTEM_PROMPT_THINK if think in (True, "r1") else SYSTEM_PROMPT_NO_THINK


def eval_text(caption: str) -> str:
    """lmms-eval's user text for ``caption``: ``Give the query: "<caption>. ", when does ...?.``; a caption's own
    final period is not doubled (Charades-STA sentences end in one)."""
    caption = caption.strip()
    return f"{EVAL_PRE_PROMPT}{caption[:-1] if caption.endswith('.') else caption}. {EVAL_POST_PROMPT}"


def user_text(query: str, think: bool | str = True, problem: str | None = None) -> str:
    """The user turn's text: ``eval_text(query)`` in the evaluation modes; else ``problem`` verbatim (the
    Temporal-R1 annotation's question, extra instructions included) or ``QUERY_TEMPLATE`` around ``query``."""
    _check_mode(think)
    if isinstance(think, PromptSpec):
        if problem is None:
            raise DataError(f"query {query!r}: a PromptSpec prompt takes its user text from the sample's problem, "
                            "which is None")
        return problem
    if think in ("r1", "custom"):
        return eval_text(query)
    return problem if problem is not None else QUERY_TEMPLATE.format(query=query)


def build_messages(query: str, think: bool | str = True, problem: str | None = None) -> list[dict]:
    """HF chat messages: the system prompt, then a user turn of [video, question text]."""
    text = user_text(query, think, problem)
    if "<|" in text:
        what = f"problem {problem!r}" if problem is not None and think in (True, False) else f"query {query!r}"
        raise DataError(f"{what} contains '<|', which would inject a special token into the prompt")
    return [
        {"role": "system", "content": system_prompt(think)},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]},
    ]


def encode_prompt(tokenizer, query: str, video_inputs: VideoInputs, think: bool | str = True,
                  problem: str | None = None) -> dict:
    """``{"input_ids": LongTensor [1, L], "prompt_text": str}`` for one video and query (``problem``: the
    annotation's question text, used verbatim by the training modes)."""
    messages = build_messages(query, think, problem)
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
    comes from, ``(video path, query, think, problem)``, so another rank can build the same prompt
    (``PromptCache`` sets it)."""

    input_ids: list[int]
    video: VideoInputs | None = None
    frames: VideoFrames | None = None
    key: tuple | None = None


def build_prompt(tokenizer, hf_config, query: str, frames: VideoFrames, think: bool | str = True,
                 problem: str | None = None) -> RolloutPrompt:
    """The Temporal-R1 prompt for ``query`` (or ``problem``) about the sampled ``frames``, patchified for
    ``hf_config``."""
    vc = hf_config.vision_config
    video = preprocess_video(frames.frames.cpu(), frames.sample_fps, patch_size=vc.patch_size,
                             temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size)
    ids = encode_prompt(tokenizer, query, video, think, problem)["input_ids"][0].tolist()
    return RolloutPrompt(input_ids=ids, video=video, frames=frames)
