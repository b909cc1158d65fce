"""The Temporal-R1 prompt: chat messages, and token ids with the video placeholder expanded.

``encode_prompt`` renders the tokenizer's chat template (generation prompt appended) and expands its single
``<|video_pad|>`` as the model family's HF processor does, before tokenising:

* Qwen2.5-VL (``Qwen2_5_VLProcessor``): ``num_video_tokens`` copies of ``<|video_pad|>``.
* Qwen3-VL (``Qwen3VLProcessor`` of transformers 5.19, and vLLM 0.32 with it): per temporal patch ``i``,
  ``<{t_i:.1f} seconds><|vision_start|>`` + ``h*w/merge^2`` pads + ``<|vision_end|>``, ``t_i`` the mean time of the
  patch's two frames (``processor.grid_timestamps``). The template's own ``<|vision_start|>`` / ``<|vision_end|>``
  around the placeholder stay, so the video reads ``<|vision_start|><0.2 seconds><|vision_start|>...<|vision_end|>
  <1.2 seconds><|vision_start|>...<|vision_end|><|vision_end|>``. (transformers before 5.10, which the models were
  released with, replaced the whole ``<|vision_start|><|video_pad|><|vision_end|>`` instead: two tokens fewer, no
  outer pair. vLLM follows whichever transformers is installed; so do we, pinned in
  ``tests/data/test_qwen3_vl_prompt.py``.)

The family is ``hf_config``'s (``models.family.family_of``). ``prompt_text`` keeps the single placeholder: vLLM
expands it itself, from the token ids and frames ``rollout.vllm_engine`` gives it (``vllm_prompt_ids``, ``vllm_video``).
``build_prompt`` makes the ``RolloutPrompt`` every engine and the trainer take: the ids, the video's patches and its
decoded frames. ``QWEN3_VL_CHAT_TEMPLATE`` is the Qwen3-VL Instruct models' chat template (the tiny tokenizer's,
for a Qwen3-VL demo model).

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

from megatron_tr1.data.processor import VideoInputs, prepare_video
from megatron_tr1.data.video import VideoFrames
from megatron_tr1.errors import DataError
from megatron_tr1.models.family import QWEN2_5_VL, QWEN3_VL, family_of

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
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# Qwen/Qwen3-VL-*-Instruct chat_template.json (the Thinking models' differ), transcribed from a public copy of the
# released file. Without tools and with a system turn it renders a video prompt exactly as Qwen2.5-VL's template
# does; unlike it, it writes no default system turn.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


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


def _family(hf_config, video_inputs: VideoInputs) -> str:
    """``hf_config``'s family; without a config, Qwen3-VL exactly when the video carries timestamps (``VideoInputs``
    made for Qwen3-VL always do, Qwen2.5-VL's never)."""
    if hf_config is not None:
        return family_of(hf_config)
    return QWEN3_VL if video_inputs.timestamps is not None else QWEN2_5_VL


def expand_video(prompt_text: str, video_inputs: VideoInputs, family: str = QWEN2_5_VL) -> str:
    """``prompt_text`` with its single ``<|video_pad|>`` expanded as ``family``'s HF processor does (module
    docstring)."""
    if (count := prompt_text.count(VIDEO_TOKEN)) != 1:
        raise DataError(f"the tokenizer's chat template wrote {VIDEO_TOKEN} {count} times, expected once")
    if family != QWEN3_VL:
        return prompt_text.replace(VIDEO_TOKEN, VIDEO_TOKEN * video_inputs.num_video_tokens)
    frames = int(video_inputs.video_grid_thw[0, 0])
    if video_inputs.timestamps is None or len(video_inputs.timestamps) != frames:
        got = "none" if video_inputs.timestamps is None else len(video_inputs.timestamps)
        raise DataError(f"a Qwen3-VL video prompt needs one timestamp per temporal patch ({frames}), got {got}; "
                        "make the video inputs with data.processor.prepare_video")
    pads = VIDEO_TOKEN * (video_inputs.num_video_tokens // frames)
    video = "".join(f"<{t:.1f} seconds>{VISION_START}{pads}{VISION_END}" for t in video_inputs.timestamps)
    return prompt_text.replace(VIDEO_TOKEN, video)


def encode_prompt(tokenizer, query: str, video_inputs: VideoInputs, think: bool | str = True,
                  problem: str | None = None, hf_config=None) -> dict:
    """``{"input_ids": LongTensor [1, L], "prompt_text": str}`` for one video and query (``problem``: the
    annotation's question text, used verbatim by the training modes). The video placeholder is expanded for
    ``hf_config``'s family (without one: Qwen3-VL when ``video_inputs`` has timestamps, else Qwen2.5-VL)."""
    messages = build_messages(query, think, problem)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expanded = expand_video(prompt_text, video_inputs, _family(hf_config, video_inputs))
    ids = tokenizer(expanded, add_special_tokens=True)["input_ids"]
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "prompt_text": prompt_text}


@dataclasses.dataclass
class RolloutPrompt:
    """One prompt. ``input_ids``: token ids with the video placeholder expanded (one ``<|video_pad|>`` per
    visual token, as the trainer sees them). ``video``: its patches (HF engine, positions). ``frames``: the
    decoded frames the patches came from (vLLM patchifies them itself; no second decode). ``key``: where it
    comes from, ``(video path, query, think, problem, clip)``, so another rank can build the same prompt
    (``PromptCache`` sets it)."""

    input_ids: list[int]
    video: VideoInputs | None = None
    frames: VideoFrames | None = None
    key: tuple | None = None


def build_prompt(tokenizer, hf_config, query: str, frames: VideoFrames, think: bool | str = True,
                 problem: str | None = None) -> RolloutPrompt:
    """The Temporal-R1 prompt for ``query`` (or ``problem``) about the sampled ``frames``, patchified for
    ``hf_config`` (its family's patches, mean/std and, for Qwen3-VL, timestamps: ``processor.prepare_video``)."""
    video = prepare_video(hf_config, frames)
    ids = encode_prompt(tokenizer, query, video, think, problem, hf_config)["input_ids"][0].tolist()
    return RolloutPrompt(input_ids=ids, video=video, frames=frames)
