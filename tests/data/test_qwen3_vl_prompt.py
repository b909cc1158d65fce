"""The Qwen3-VL prompt and preprocessing against transformers' ``Qwen3VLProcessor`` and vLLM's prompt replacement.

The processor is transformers' own, loaded with ``AutoProcessor`` from a folder holding the tiny tokenizer with
``QWEN3_VL_CHAT_TEMPLATE`` and ``hf_preprocessor_configs("qwen3_vl")`` (so the configs are checked too); its
``Qwen3VLVideoProcessor`` runs for real (torchvision's Python part, ``megatron_tr1.torchvision_cpu``) and its resize
is a no-op on the frames. vLLM's side is its static pieces (timestamps from the request's metadata, the per-frame
replacement, the placeholder search), run on ``vllm_prompt_ids`` / ``vllm_video``'s output, without an engine.
"""
from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch
from transformers import AutoProcessor, Qwen3VLConfig
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_qwen3_smart_resize
from transformers.video_utils import VideoMetadata

from megatron_tr1.data.processor import (QWEN3_VL_MEAN, QWEN3_VL_STD, VideoInputs, grid_timestamps,
                                         hf_preprocessor_configs, prepare_video, preprocess_video)
from megatron_tr1.data.prompt import (QWEN3_VL_CHAT_TEMPLATE, build_messages, build_prompt, encode_prompt,
                                      expand_video)
from megatron_tr1.data.video import VideoFrames
from megatron_tr1.rollout.vllm_engine import vllm_prompt_ids, vllm_video
from megatron_tr1.demo import TINY_SPECIAL_TOKENS, build_tiny_tokenizer, tiny_hf_config
from megatron_tr1.errors import DataError
from megatron_tr1.models.qwen3_vl.rope_index import get_rope_index

START, END = TINY_SPECIAL_TOKENS["<|vision_start|>"], TINY_SPECIAL_TOKENS["<|vision_end|>"]
VIDEO = TINY_SPECIAL_TOKENS["<|video_pad|>"]
QUERY = "a woman plays the guitar"


def tiny_qwen3_vl_config() -> Qwen3VLConfig:
    """A small Qwen3-VL config with the tiny tokenizer's special token ids and Qwen3-VL's real patch sizes."""
    return Qwen3VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=TINY_SPECIAL_TOKENS["<|image_pad|>"], video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END)


CONFIG = tiny_qwen3_vl_config()


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def processor(tmp_path_factory, tok):
    """transformers' Qwen3VLProcessor as a Qwen3-VL model folder with our files would load it."""
    folder = tmp_path_factory.mktemp("qwen3_vl_processor")
    tok.save_pretrained(folder)
    for name, config in hf_preprocessor_configs("qwen3_vl").items():
        (folder / name).write_text(json.dumps(config))
    return AutoProcessor.from_pretrained(folder)


def _frames(t, h, w, indices, video_fps, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.tensor(indices)
    return VideoFrames(frames=torch.randint(0, 256, (t, 3, h, w), dtype=torch.uint8, generator=g),
                       timestamps=indices.double() / video_fps, indices=indices, sample_fps=t / total * video_fps,
                       duration=total / video_fps, total_frames=total, video_fps=video_fps)


# (t, h, w, frame numbers, video fps, total frames): odd and even counts, fractional and integer rates,
# timestamps rounding both ways, frames taller than wide
VIDEOS = [
    (4, 64, 96, [0, 10, 20, 29], 29.97, 30),
    (5, 64, 96, [0, 7, 15, 22, 30], 29.97, 40),
    (6, 96, 32, [0, 25, 50, 75, 100, 124], 25.0, 125),
    (2, 32, 32, [3, 4], 2.0, 8),
]


def test_processor_folder_loads_qwen3_vl_classes(processor):
    assert type(processor) is Qwen3VLProcessor
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    vp = processor.video_processor
    assert (vp.patch_size, vp.temporal_patch_size, vp.merge_size) == (16, 2, 2)
    assert tuple(vp.image_mean) == QWEN3_VL_MEAN and tuple(vp.image_std) == QWEN3_VL_STD
    assert processor.image_processor.patch_size == 16


@pytest.mark.parametrize("t,h,w,indices,video_fps,total", VIDEOS)
@pytest.mark.parametrize("think", [True, "custom"])
def test_ids_and_patches_equal_qwen3_vl_processor(tok, processor, t, h, w, indices, video_fps, total, think):
    frames = _frames(t, h, w, indices, video_fps, total, seed=t)
    prompt = build_prompt(tok, CONFIG, QUERY, frames, think)

    text = tok.apply_chat_template(build_messages(QUERY, think), tokenize=False, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps, frames_indices=list(indices),
                             duration=total / video_fps)
    ref = processor(text=[text], videos=[frames.frames], video_metadata=[metadata], return_tensors="pt")
    assert prompt.input_ids == ref["input_ids"][0].tolist()
    assert torch.equal(prompt.video.video_grid_thw, ref["video_grid_thw"])
    assert prompt.video.pixel_values_videos.dtype == torch.float32
    assert torch.equal(prompt.video.pixel_values_videos, ref["pixel_values_videos"])  # HF resized nothing
    assert prompt.video.timestamps == processor._calculate_timestamps(list(indices), video_fps, 2)

    # and the positions on them: ours from the grid, transformers' from its processor's mm_token_type_ids
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    hf = types.SimpleNamespace(config=CONFIG)
    hf.get_vision_position_ids = lambda *a, **k: Qwen3VLModel.get_vision_position_ids(hf, *a, **k)
    theirs, _ = Qwen3VLModel.get_rope_index(hf, ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"],
                                            video_grid_thw=ref["video_grid_thw"])
    ids = torch.tensor([prompt.input_ids])
    assert torch.equal(get_rope_index(CONFIG, ids, video_grid_thw=prompt.video.video_grid_thw), theirs)


def test_prompt_format_exact(tok):
    """Per temporal patch ``<t seconds>`` then the frame's own start, pads and end, all inside the chat template's
    start/end (transformers >= 5.10; its 4.x and the models' release replaced the template's start/end too, two
    tokens fewer: this fails if the installed transformers goes back to that)."""
    frames = _frames(4, 32, 64, [0, 10, 20, 29], 29.97, 30)
    video = prepare_video(CONFIG, frames)
    assert video.timestamps == [5 / 29.97, 24.5 / 29.97] and video.num_video_tokens == 4
    out = encode_prompt(tok, "the dog jumps", video, think="custom", hf_config=CONFIG)
    pads = "<|video_pad|>" * 2
    assert tok.decode(out["input_ids"][0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><0.2 seconds><|vision_start|>{pads}<|vision_end|>"
        f"<0.8 seconds><|vision_start|>{pads}<|vision_end|><|vision_end|>"
        'Give the query: "the dog jumps. ", when does the described content occur in the video?.<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert out["prompt_text"].count("<|video_pad|>") == 1  # vLLM's text keeps the single placeholder
    ids = out["input_ids"][0].tolist()
    assert ids.count(START) == ids.count(END) == 2 + 1
    # without hf_config the family follows the video: timestamps -> Qwen3-VL
    assert torch.equal(encode_prompt(tok, "the dog jumps", video, think="custom")["input_ids"], out["input_ids"])


def test_grid_timestamps_equal_transformers():
    calc = Qwen3VLProcessor._calculate_timestamps
    for indices, fps in [([0, 10, 20, 29], 29.97), ([0, 7, 15], 30.0), ([5], 24.0), (list(range(0, 300, 7)), 23.976)]:
        for tp in (2, 3):
            assert grid_timestamps(indices, fps, tp) == calc(None, list(indices), fps, tp)
    with pytest.raises(DataError, match="video_fps > 0"):
        grid_timestamps([0, 1], 0.0)


@pytest.mark.parametrize("t,h,w", [(4, 64, 96), (3, 32, 64), (1, 96, 32), (6, 128, 32)])
def test_patches_equal_qwen3_vl_video_processor(processor, t, h, w):
    """``preprocess_video`` with Qwen3-VL's numbers is ``Qwen3VLVideoProcessor`` without a resize, bit for bit (one
    frame: HF's patchify pads it to two as ours does; its smart_resize would refuse a single frame)."""
    frames = torch.randint(0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(h + t), dtype=torch.uint8)
    ours = preprocess_video(frames, 2.0, patch_size=16, image_mean=QWEN3_VL_MEAN, image_std=QWEN3_VL_STD)
    ref = processor.video_processor(videos=[frames], do_resize=False, do_sample_frames=False, return_tensors="pt")
    assert torch.equal(ours.video_grid_thw, ref["video_grid_thw"])
    assert torch.equal(ours.pixel_values_videos, ref["pixel_values_videos"])


def test_video_processor_config_keeps_sampled_frames():
    """Every frame size a 32-multiple sampling gives (at most 768 merged patches a frame, 2..768 frames) is a fixed
    point of Qwen3VLVideoProcessor's smart_resize with the bounds we write."""
    video = hf_preprocessor_configs("qwen3_vl")["video_preprocessor_config.json"]
    lo, hi = video["size"]["shortest_edge"], video["size"]["longest_edge"]
    assert (video["cap_pixels_per_frame"], video["do_sample_frames"]) == (False, False)
    for h, w in [(32, 32), (32, 6400), (448, 448), (864, 864), (736, 1056), (512, 1536)]:
        assert h * w <= 768 * 32 * 32
        for nframes in (2, 3, 30, 767, 768):
            assert hf_qwen3_smart_resize(nframes, h, w, 2, 32, lo, hi) == (h, w)


def test_qwen2_5_vl_unchanged(tok):
    """The family dispatch leaves Qwen2.5-VL as it was: no timestamps, the same ids as encode_prompt without a
    config, vLLM's ids and metadata as VLLMEngine built them."""
    q25 = tiny_hf_config()
    tok25 = build_tiny_tokenizer()
    frames = _frames(4, 56, 112, [0, 10, 20, 29], 29.97, 30)
    prompt = build_prompt(tok25, q25, QUERY, frames)
    assert prompt.video.timestamps is None
    video = preprocess_video(frames.frames, frames.sample_fps, patch_size=q25.vision_config.patch_size)
    assert torch.equal(prompt.video.pixel_values_videos, video.pixel_values_videos)
    assert prompt.input_ids == encode_prompt(tok25, QUERY, video)["input_ids"][0].tolist()
    ids = prompt.input_ids
    old = [t for i, t in enumerate(ids) if t != VIDEO or i == 0 or ids[i - 1] != VIDEO]  # VLLMEngine's own
    assert vllm_prompt_ids(q25, ids) == old and old.count(VIDEO) == 1
    array, metadata = vllm_video(q25, frames)
    assert array.shape == (4, 56, 112, 3) and (array == frames.frames.permute(0, 2, 3, 1).numpy()).all()
    assert metadata == dict(total_num_frames=4, fps=frames.sample_fps, duration=4 / frames.sample_fps,
                            frames_indices=[0, 1, 2, 3], do_sample_frames=False)
    assert hf_preprocessor_configs() == hf_preprocessor_configs("qwen2_5_vl")
    with pytest.raises(DataError, match="unknown family 'llava'"):
        hf_preprocessor_configs("llava")


def test_missing_timestamps_is_a_clear_error(tok):
    video = preprocess_video(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), 2.0, patch_size=16)
    with pytest.raises(DataError, match=r"one timestamp per temporal patch \(2\), got none"):
        encode_prompt(tok, QUERY, video, hf_config=CONFIG)
    with pytest.raises(DataError, match="wrote <\\|video_pad\\|> 2 times"):
        expand_video("<|video_pad|><|video_pad|>", VideoInputs(video.pixel_values_videos, video.video_grid_thw, 1.0, 2))
    with pytest.raises(DataError, match="hold no Qwen3-VL video"):
        vllm_prompt_ids(CONFIG, [1, START, VIDEO, END, 2])  # the single placeholder is not an expanded prompt


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (README 'Rollouts on CPU')")
@pytest.mark.parametrize("t,h,w,indices,video_fps,total", VIDEOS)
def test_vllm_rebuilds_our_ids(tok, processor, t, h, w, indices, video_fps, total):
    """What vLLM 0.32 makes of ``vllm_prompt_ids`` + ``vllm_video``: timestamps from the metadata
    (``Qwen3VLProcessingInfo._get_video_second_idx``), each frame's tokens (``get_video_repl``), the placeholder they
    replace (the bare ``<|video_pad|>`` with transformers >= 5.10), are our ids."""
    from megatron_tr1.torchvision_cpu import allow_torchvision_without_ops

    allow_torchvision_without_ops()
    from vllm.model_executor.models.qwen3_vl import (Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo,
                                                     _replace_video_token_placeholders)

    frames = _frames(t, h, w, indices, video_fps, total, seed=t)
    prompt = build_prompt(tok, CONFIG, QUERY, frames)
    ids = vllm_prompt_ids(CONFIG, prompt.input_ids)
    assert ids == tok(tok.apply_chat_template(build_messages(QUERY), tokenize=False, add_generation_prompt=True)
                      )["input_ids"]  # the chat template's single placeholder, as VLLMEngine sends it
    array, metadata = vllm_video(CONFIG, frames)
    assert array.shape == (t, h, w, 3)

    info = types.SimpleNamespace(get_video_processor=lambda: processor.video_processor)
    info._calculate_timestamps = lambda *a: Qwen3VLProcessingInfo._calculate_timestamps(info, *a)
    as_vllm_reads_it = VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})
    timestamps = Qwen3VLProcessingInfo._get_video_second_idx(info, as_vllm_reads_it, metadata["do_sample_frames"])
    assert timestamps == prompt.video.timestamps
    grid = prompt.video.video_grid_thw[0].tolist()
    repl = Qwen3VLMultiModalProcessor.get_video_repl(
        tokens_per_frame=[grid[1] * grid[2] // 4] * grid[0], timestamps=timestamps, tokenizer=tok,
        vision_start_token_id=START, vision_end_token_id=END, video_token_id=VIDEO, select_token_id=True)
    assert Qwen3VLMultiModalProcessor._expands_only_video_token(processor)  # transformers >= 5.10
    assert _replace_video_token_placeholders(ids, [VIDEO], [list(repl.full)]) == prompt.input_ids
