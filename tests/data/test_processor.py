"""Qwen2.5-VL video preprocessing against transformers' own code.

transformers' ``Qwen2VLVideoProcessor`` module imports torchvision (not installable on CPU here), so its
``patchify`` method is compiled straight from the installed source file and run on the same normalised
video; the fused rescale/normalise is torchvision's ``normalize`` re-done as its source does it. The
torchvision-free ``Qwen2VLImageProcessorPil`` (numpy) is a second, independent reference: an image is a
two-frame still video.
"""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch

import transformers.models.qwen2_vl as qwen2_vl_pkg
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from megatron_tr1.data.processor import (
    MERGE_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PATCH_SIZE,
    hf_preprocessor_configs,
    preprocess_video,
)
from megatron_tr1.data.video import IMAGE_FACTOR, frame_size
from megatron_tr1.errors import DataError


def _hf_video_patchify():
    """``Qwen2VLVideoProcessor.patchify`` compiled from transformers' installed source (no torchvision needed)."""
    path = os.path.join(os.path.dirname(qwen2_vl_pkg.__file__), "video_processing_qwen2_vl.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.returns = None
    for arg in fn.args.args:
        arg.annotation = None
    namespace = {"torch": torch}
    exec(compile(ast.Module([fn], type_ignores=[]), path, "exec"), namespace)
    return namespace["patchify"]


def _hf_video_reference(frames: torch.Tensor):
    """transformers' video path: fused rescale+normalise (``_fuse_mean_std_and_rescale_factor`` +
    ``tvF.normalize``: sub then div), then its own ``patchify`` on a batch of one."""
    mean = torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))
    video = frames[None].to(torch.float32).sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
    patches, t, h, w = _hf_video_patchify()(None, video, patch_size=14, merge_size=2, temporal_patch_size=2)
    return patches[0], [t, h, w]


def _frames(t, h, w, seed=0):
    return torch.randint(0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("t,h,w", [(4, 56, 84), (5, 28, 56), (1, 84, 56), (6, 112, 28)])
def test_matches_transformers_video_processor_bit_for_bit(t, h, w):
    frames = _frames(t, h, w)
    out = preprocess_video(frames, sample_fps=2.0)
    ref, grid = _hf_video_reference(frames)
    assert out.video_grid_thw.tolist() == [grid] and out.video_grid_thw.dtype == torch.long
    assert out.pixel_values_videos.dtype == torch.float32 and out.pixel_values_videos.shape == ref.shape
    assert torch.equal(out.pixel_values_videos, ref)
    assert out.num_video_tokens == grid[0] * grid[1] * grid[2] // 4


def test_patch_layout_read_by_index():
    """Row r, column c of the output holds the pixel the layout says: row = ((t*H' + bh)*W' + bw)*m*m + i*m + j
    over merge blocks (bh, bw) and in-block patch (i, j); column = ((ch*tp + dt)*p + y)*p + x."""
    frames = _frames(3, 56, 84, seed=1)  # odd: frame 2 is repeated as frame 3
    out = preprocess_video(frames, sample_fps=1.5).pixel_values_videos
    std = torch.tensor(OPENAI_CLIP_STD) * 255
    mean = torch.tensor(OPENAI_CLIP_MEAN) * 255
    p, m, tp = 14, 2, 2
    rng = np.random.default_rng(0)
    for _ in range(300):
        t, bh, bw, i, j = rng.integers(2), rng.integers(2), rng.integers(3), rng.integers(m), rng.integers(m)
        ch, dt, y, x = rng.integers(3), rng.integers(tp), rng.integers(p), rng.integers(p)
        row = ((t * 2 + bh) * 3 + bw) * m * m + i * m + j
        col = ((ch * tp + dt) * p + y) * p + x
        frame = min(t * tp + dt, 2)
        pixel = frames[frame, ch, (bh * m + i) * p + y, (bw * m + j) * p + x].float()
        assert out[row, col] == (pixel - mean[ch]) / std[ch]


def test_still_image_matches_pil_image_processor():
    """A 2-frame video of one image is what ``Qwen2VLImageProcessorPil`` makes of that image (it repeats the
    image temporal_patch_size times). Its numpy rescale-then-normalise differs from the fused torch one
    by float rounding only."""
    image = _frames(1, 56, 112, seed=2)[0]
    ref = Qwen2VLImageProcessorPil(do_resize=False)(image.permute(1, 2, 0).numpy(), return_tensors="pt")
    out = preprocess_video(image[None].expand(2, -1, -1, -1).contiguous(), sample_fps=2.0)
    assert out.video_grid_thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 8]]
    torch.testing.assert_close(out.pixel_values_videos, ref["pixel_values"], rtol=0, atol=2e-6)


def test_second_per_grid_ts_and_token_count():
    out = preprocess_video(_frames(6, 56, 84), sample_fps=2.0)
    assert out.second_per_grid_ts == 1.0  # 2 frames per temporal patch at 2 fps
    assert out.num_video_tokens == 3 * 4 * 6 // 4
    assert preprocess_video(_frames(4, 28, 28), sample_fps=0.5).second_per_grid_ts == 4.0


@pytest.mark.parametrize(
    "frames,fps,match",
    [
        (torch.zeros(4, 3, 56, 80, dtype=torch.uint8), 2.0, "4 frames of 56x80; need .* multiples of 28"),
        (torch.zeros(4, 3, 56, 84), 2.0, "uint8 tensor .* got torch.float32"),
        (torch.zeros(4, 56, 84, 3, dtype=torch.uint8), 2.0, r"\[T, 3, H, W\], got torch.uint8 \[4, 56, 84, 3\]"),
        (torch.zeros(0, 3, 56, 84, dtype=torch.uint8), 2.0, "got 0 frames"),
        (torch.zeros(4, 3, 56, 84, dtype=torch.uint8), 0.0, "sample_fps must be > 0, got 0.0"),
    ],
)
def test_bad_input(frames, fps, match):
    with pytest.raises(DataError, match=match):
        preprocess_video(frames, fps)


def test_preprocessor_configs_agree_with_constants_and_sampling():
    configs = hf_preprocessor_configs()
    video = configs["video_preprocessor_config.json"]
    assert IMAGE_FACTOR == PATCH_SIZE * MERGE_SIZE == 28
    assert (video["patch_size"], video["temporal_patch_size"], video["merge_size"]) == (14, 2, 2)
    assert video["image_mean"] == list(OPENAI_CLIP_MEAN) and video["image_std"] == list(OPENAI_CLIP_STD)
    # every frame size sample_frames can produce is a fixed point of HF's smart_resize with these bounds
    lo, hi = video["size"]["shortest_edge"], video["size"]["longest_edge"]
    for h, w in [(64, 96), (360, 480), (360, 640), (1080, 1920), (20, 30), (28, 5000)]:
        for nframes in (2, 30, 200, 768):
            size = frame_size(h, w, nframes)
            assert hf_smart_resize(*size, factor=28, min_pixels=lo, max_pixels=hi) == size
