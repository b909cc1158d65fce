"""The Temporal-R1 prompt and the tiny tokenizer, against transformers' ``Qwen2_5_VLProcessor``.

The processor's real ``__call__`` runs (chat text -> placeholder expansion -> tokenizer); only its video
processor, which needs torchvision, is replaced by one returning ``preprocess_video``'s output (checked
against transformers in test_processor.py).
"""
from __future__ import annotations

import json
import random
import string
import types

import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from megatron_tr1.data.processor import hf_preprocessor_configs, preprocess_video
from megatron_tr1.data.prompt import SYSTEM_PROMPT_NO_THINK, SYSTEM_PROMPT_THINK, build_messages, encode_prompt
from megatron_tr1.errors import DataError
from megatron_tr1.demo import TINY_SPECIAL_TOKENS
from megatron_tr1.demo import _tokenizer_json, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _hf_processor(tokenizer, video_inputs, sample_fps):
    """``Qwen2_5_VLProcessor`` with a stand-in video processor that returns our ``video_inputs``."""

    class VideoProcessor:
        merge_size, temporal_patch_size = 2, 2

        def __call__(self, videos, **kwargs):
            return {
                "pixel_values_videos": video_inputs.pixel_values_videos,
                "video_grid_thw": video_inputs.video_grid_thw,
                "video_metadata": [types.SimpleNamespace(sampled_fps=sample_fps)],
            }

    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)  # __init__ insists on the torchvision classes
    proc.tokenizer, proc.video_processor = tokenizer, VideoProcessor()
    proc.image_token, proc.image_token_id = "<|image_pad|>", tokenizer.convert_tokens_to_ids("<|image_pad|>")
    proc.video_token, proc.video_token_id = "<|video_pad|>", tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return proc


def test_prompt_text_is_temporal_r1s():
    assert SYSTEM_PROMPT_THINK == (
        "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
        "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
        "<answer> </answer> tags. Output the final answer in JSON format."
    )
    user = build_messages("person opens a door")[1]
    assert user == {
        "role": "user",
        "content": [
            {"type": "video"},
            {"type": "text", "text": 'Give the query: "person opens a door", when does the described content occur '
                                     "in the video?."},
        ],
    }
    assert build_messages("x", think=False)[0] == {"role": "system", "content": SYSTEM_PROMPT_NO_THINK}
    assert "<think>" not in SYSTEM_PROMPT_NO_THINK
    assert '<answer>{"start_time": "...", "end_time": "..."}</answer>' in SYSTEM_PROMPT_NO_THINK
    with pytest.raises(DataError, match=r"query 'a <\|video_pad\|> b' contains '<\|'"):
        build_messages("a <|video_pad|> b")


def test_prompt_text_exact(tok):
    video = preprocess_video(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), 2.0)
    out = encode_prompt(tok, "the dog jumps", video, think=False)
    assert out["prompt_text"] == (
        f"<|im_start|>system\n{SYSTEM_PROMPT_NO_THINK}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        'Give the query: "the dog jumps", when does the described content occur in the video?.<|im_end|>\n'
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("t,h,w,fps,think", [(4, 56, 84, 2.0, True), (5, 28, 56, 1.25, False), (2, 112, 56, 0.5, True)])
def test_encode_prompt_matches_qwen2_5_vl_processor(tok, t, h, w, fps, think):
    frames = torch.randint(0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(t), dtype=torch.uint8)
    video = preprocess_video(frames, fps)
    query = "a woman plays the guitar"
    out = encode_prompt(tok, query, video, think=think)

    text = tok.apply_chat_template(build_messages(query, think), tokenize=False, add_generation_prompt=True)
    ref = _hf_processor(tok, video, fps)(text=[text], videos=[frames], return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape[0] == 1
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert ref["second_per_grid_ts"].tolist() == [pytest.approx(video.second_per_grid_ts)]
    assert torch.equal(ref["video_grid_thw"], video.video_grid_thw)

    ids = out["input_ids"][0].tolist()
    start, end = ids.index(TINY_SPECIAL_TOKENS["<|vision_start|>"]), ids.index(TINY_SPECIAL_TOKENS["<|vision_end|>"])
    assert ids[start + 1 : end] == [TINY_SPECIAL_TOKENS["<|video_pad|>"]] * video.num_video_tokens
    assert ids.count(TINY_SPECIAL_TOKENS["<|video_pad|>"]) == video.num_video_tokens
    tail = tok("<|im_start|>assistant\n")["input_ids"]
    assert ids[-len(tail) :] == tail and ids[: len(tail)] != tail


# ---- tiny tokenizer ----

def test_tiny_tokenizer_special_tokens(tok):
    for token, idx in TINY_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == idx
        ids = tok(f"ab{token}cd")["input_ids"]
        assert ids.count(idx) == 1 and tok.decode(ids) == f"ab{token}cd"
    assert tok("<|im_end|>")["input_ids"] == [2]  # never split into bytes
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2, "<|endoftext|>", 0)
    assert len(build_tiny_tokenizer()) == len(tok) == 512
    assert max(max(tok(t)["input_ids"]) for t in ["hello", "\x00\x7f~", "<think>"]) < 512


def test_tiny_tokenizer_round_trips_ascii(tok):
    rng = random.Random(0)
    texts = [
        '<think>It starts at 1.2 s.</think>\n<answer>{"start_time": "1.2", "end_time": "3.4"}</answer>',
        "  leading and trailing spaces  ", "tabs\tand\nnew\r\nlines", "", " ", "zzz qqq XYZ !!! ###",
    ]
    texts += ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 80))) for _ in range(50)]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    answer = '<answer>{"start_time": "12.5", "end_time": "20.0"}</answer>'
    assert len(tok(answer)["input_ids"]) < len(answer) / 2  # the corpus taught it the answer format


def test_tiny_tokenizer_is_deterministic():
    assert _tokenizer_json.__wrapped__() == _tokenizer_json.__wrapped__()


def test_tiny_tokenizer_chat_template_is_qwen2_5_vls(tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "yes"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # default system turn
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n"
    )


def test_tiny_tokenizer_saves_a_model_dir(tmp_path, tok):
    build_tiny_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = build_messages("someone sneezes")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (2, 0, 512)
    for name, config in hf_preprocessor_configs().items():
        assert json.loads((tmp_path / name).read_text()) == config


def test_the_seeds_evaluation_prompts():
    from megatron_tr1.data.prompt import SYSTEM_PROMPT_PLAIN, eval_text

    want = 'Give the query: "person turn a light on. ", when does the described content occur in the video?.'
    assert eval_text("person turn a light on") == want == eval_text(" person turn a light on. ")
    custom, r1 = build_messages("person turn a light on.", "custom"), build_messages("person turn a light on", "r1")
    assert SYSTEM_PROMPT_PLAIN == "You are a helpful assistant."
    assert custom[0] == {"role": "system", "content": SYSTEM_PROMPT_PLAIN}
    assert r1[0] == {"role": "system", "content": SYSTEM_PROMPT_THINK}
    assert custom[1]["content"][1]["text"] == r1[1]["content"][1]["text"] == want
    # the evaluation modes ignore a training problem text; the training modes use it verbatim
    problem = 'Give the query: "x", when does the described content occur in the video?. Reply in seconds.'
    assert build_messages("x", "r1", problem)[1]["content"][1]["text"] == eval_text("x")
    assert build_messages("x", True, problem)[1]["content"][1]["text"] == problem
    with pytest.raises(ValueError, match="prompt mode 'R1' is not one of"):
        build_messages("x", "R1")
