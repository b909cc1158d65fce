"""Qwen2.5-VL video preprocessing in torch: sampled uint8 frames -> vision-tower patches.

Same numbers and layout as transformers' ``Qwen2VLVideoProcessor`` (which needs torchvision) with
``do_resize`` a no-op, because ``data.video.sample_frames`` already resized the frames to multiples of 28:
rescale and normalise fused as ``(x - 255 * mean) / (255 * std)`` in float32, pad the frame count to a
multiple of ``temporal_patch_size`` by repeating the last frame, then cut
``[t, tp, C, h/m, m, p, w/m, m, p]`` patches and order them ``(t, h/m, w/m, m, m) x (C, tp, p, p)``, so the
``m x m`` patches that the merger fuses into one LLM token are consecutive rows.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_tr1.data.video import MIN_PIXELS, VIDEO_MAX_PIXELS
from megatron_tr1.errors import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
RESCALE_FACTOR = 1 / 255


@dataclasses.dataclass
class VideoInputs:
    """Vision inputs for one video, as ``Qwen2_5_VLProcessor`` returns them.

    ``pixel_values_videos``: float32 ``[t*h*w, 3*tp*p*p]``; ``video_grid_thw``: long ``[1, 3]`` (patch grid);
    ``second_per_grid_ts``: seconds covered by one temporal patch (``tp / sample_fps``, for M-RoPE);
    ``num_video_tokens``: LLM tokens after the ``m x m`` merge, ``t*h*w // m**2``.
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: float
    num_video_tokens: int


def preprocess_video(
    frames: torch.Tensor,
    sample_fps: float,
    *,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> VideoInputs:
    """Patchify uint8 RGB frames ``[T, 3, H, W]`` (H, W multiples of ``patch_size * merge_size``)."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        got = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise DataError(f"preprocess_video: frames must be a uint8 tensor [T, 3, H, W], got {got}")
    num_frames, channels, height, width = frames.shape
    factor = patch_size * merge_size
    if num_frames == 0 or height % factor or width % factor or height == 0 or width == 0:
        raise DataError(
            f"preprocess_video: got {num_frames} frames of {height}x{width}; need at least one frame with height and "
            f"width multiples of {factor} (resize with data.video.sample_frames / smart_resize first)"
        )
    if not sample_fps > 0:
        raise DataError(f"preprocess_video: sample_fps must be > 0, got {sample_fps!r}")

    mean = torch.tensor(image_mean, device=frames.device) * (1.0 / RESCALE_FACTOR)
    std = torch.tensor(image_std, device=frames.device) * (1.0 / RESCALE_FACTOR)
    video = frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    if pad := -num_frames % temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    grid_t = video.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = video.view(
        grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
    return VideoInputs(
        pixel_values_videos=pixel_values,
        video_grid_thw=torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long),
        second_per_grid_ts=temporal_patch_size / sample_fps,
        num_video_tokens=grid_t * grid_h * grid_w // merge_size**2,
    )


def hf_preprocessor_configs() -> dict[str, dict]:
    """``preprocessor_config.json`` and ``video_preprocessor_config.json`` for a model directory, matching this
    module's constants. Video pixel bounds admit every frame ``sample_frames`` produces, so HF/vLLM's own
    resize leaves our frames unchanged."""
    common = {
        "do_rescale": True,
        "rescale_factor": RESCALE_FACTOR,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,  # bicubic
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "processor_class": "Qwen2_5_VLProcessor",
    }
    image = {
        **common,
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 56 * 56,
        "max_pixels": 12845056,
        "size": {"shortest_edge": 56 * 56, "longest_edge": 12845056},
    }
    video = {
        **common,
        "video_processor_type": "Qwen2VLVideoProcessor",
        "min_pixels": MIN_PIXELS,
        "max_pixels": VIDEO_MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        "do_sample_frames": False,
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}
