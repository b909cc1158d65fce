"""Qwen2.5-VL and Qwen3-VL video preprocessing in torch: sampled uint8 frames -> vision-tower patches.

Same numbers and layout as transformers' ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` (which need
torchvision) with ``do_resize`` a no-op, because ``data.video.sample_frames`` already resized the frames to multiples
of ``patch_size * merge_size``: rescale and normalise fused as ``(x - 255 * mean) / (255 * std)`` in float32, pad the
frame count to a multiple of ``temporal_patch_size`` by repeating the last frame, then cut
``[t, tp, C, h/m, m, p, w/m, m, p]`` patches and order them ``(t, h/m, w/m, m, m) x (C, tp, p, p)``, so the
``m x m`` patches that the merger fuses into one LLM token are consecutive rows. The two families differ only in
their numbers: Qwen2.5-VL 14-pixel patches and the OpenAI CLIP mean/std, Qwen3-VL 16-pixel patches and mean = std =
0.5 (its frames must be multiples of 32: ``sample_frames`` must be given that factor; today it resizes to 28).
Qwen3-VL's prompt also writes one timestamp per temporal patch, ``grid_timestamps`` (``VideoInputs.timestamps``);
``prepare_video`` picks a family's numbers from its HF config.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_tr1.data.video import MIN_PIXELS, VIDEO_MAX_PIXELS
from megatron_tr1.errors import DataError
from megatron_tr1.models.family import NAMES, QWEN2_5_VL, QWEN3_VL, family_of

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
RESCALE_FACTOR = 1 / 255
# Qwen3-VL (transformers' Qwen3VLVideoProcessor defaults: IMAGENET_STANDARD_MEAN / STD)
QWEN3_VL_PATCH_SIZE = 16
QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass
class VideoInputs:
    """Vision inputs for one video, as ``Qwen2_5_VLProcessor`` returns them.

    ``pixel_values_videos``: float32 ``[t*h*w, 3*tp*p*p]``; ``video_grid_thw``: long ``[1, 3]`` (patch grid);
    ``second_per_grid_ts``: seconds covered by one temporal patch (``tp / sample_fps``, for M-RoPE);
    ``num_video_tokens``: LLM tokens after the ``m x m`` merge, ``t*h*w // m**2``. ``timestamps``: Qwen3-VL only,
    seconds of each temporal patch (``grid_timestamps``: ``t`` values, written into the prompt); None for
    Qwen2.5-VL.
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: float
    num_video_tokens: int
    timestamps: list[float] | None = None


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


def grid_timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int = TEMPORAL_PATCH_SIZE
                    ) -> list[float]:
    """Qwen3-VL's time of each temporal patch, in seconds: the frame numbers ``indices`` padded to a multiple of
    ``temporal_patch_size`` by repeating the last, each ``index / video_fps``, then the mean of each patch's first and
    last frame (``Qwen3VLProcessor._calculate_timestamps``, and vLLM's, in the same float64 steps)."""
    indices = [int(i) for i in indices]
    if not indices or not video_fps > 0:
        raise DataError(f"grid_timestamps: need frame indices and video_fps > 0, got {len(indices)} indices and "
                        f"video_fps={video_fps!r}")
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def prepare_video(hf_config, frames) -> VideoInputs:
    """``preprocess_video`` of ``frames`` (a ``data.video.VideoFrames``) with ``hf_config``'s patch sizes and its
    family's mean/std; for Qwen3-VL also the ``timestamps`` of its temporal patches (from the frames' numbers and the
    video's frame rate: times in the whole video)."""
    vc = hf_config.vision_config
    qwen3 = family_of(hf_config) == QWEN3_VL
    mean, std = (QWEN3_VL_MEAN, QWEN3_VL_STD) if qwen3 else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    out = preprocess_video(frames.frames.cpu(), frames.sample_fps, patch_size=vc.patch_size,
                           temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
                           image_mean=mean, image_std=std)
    if qwen3:
        out.timestamps = grid_timestamps(frames.indices.tolist(), frames.video_fps, vc.temporal_patch_size)
    return out


def _common_config(mean, std, patch_size: int, processor_class: str) -> dict:
    """The keys a family's image and video processor configs share: rescale, normalise with ``mean`` / ``std``,
    bicubic resize, ``patch_size`` x temporal patch 2, merge 2."""
    return {"do_rescale": True, "rescale_factor": RESCALE_FACTOR, "do_normalize": True, "image_mean": list(mean),
            "image_std": list(std), "do_convert_rgb": True, "do_resize": True, "resample": 3,  # bicubic
            "patch_size": patch_size, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": MERGE_SIZE,
            "processor_class": processor_class}


def hf_preprocessor_configs(family: str = QWEN2_5_VL) -> dict[str, dict]:
    """``preprocessor_config.json`` and ``video_preprocessor_config.json`` for a model directory of ``family``
    (``models.family``: "qwen2_5_vl" or "qwen3_vl"), matching this module's constants. Video pixel bounds admit
    every frame ``sample_frames`` produces (for Qwen3-VL: every 32-multiple frame of at most 768 merged patches, 2 to
    768 frames), so HF/vLLM's own resize leaves our frames unchanged."""
    if family == QWEN3_VL:
        return _qwen3_vl_preprocessor_configs()
    if family != QWEN2_5_VL:
        raise DataError(f"hf_preprocessor_configs: unknown family {family!r}; choose from {sorted(NAMES)}")
    common = _common_config(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PATCH_SIZE, "Qwen2_5_VLProcessor")
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


# Qwen3-VL's video processor bounds the pixels of a whole video (t * h * w, t rounded to even), not of a frame:
# the least is two frames of one 32x32 merged patch, the most 768 frames of 768 merged patches (qwen-vl-utils'
# VIDEO_MAX_TOKEN_NUM per frame, also Qwen3VLVideoProcessor's max_video_tokens), so every frame size a
# 32-multiple sampling under that per-frame cap produces is a fixed point of its smart_resize.
QWEN3_VL_VIDEO_MIN_PIXELS = 2 * (QWEN3_VL_PATCH_SIZE * MERGE_SIZE) ** 2
QWEN3_VL_VIDEO_MAX_TOKENS = 768
QWEN3_VL_VIDEO_MAX_PIXELS = 768 * QWEN3_VL_VIDEO_MAX_TOKENS * (QWEN3_VL_PATCH_SIZE * MERGE_SIZE) ** 2


def _qwen3_vl_preprocessor_configs() -> dict[str, dict]:
    """Qwen3-VL's processor configs: the released models' image processor (Qwen2VLImageProcessor, 16-pixel
    patches, mean = std = 0.5, its pixel bounds) and a ``Qwen3VLVideoProcessor`` that keeps sampled frames as they
    are (no frame sampling, bounds as ``QWEN3_VL_VIDEO_MIN_PIXELS`` / ``MAX_PIXELS``, no per-frame cap)."""
    common = _common_config(QWEN3_VL_MEAN, QWEN3_VL_STD, QWEN3_VL_PATCH_SIZE, "Qwen3VLProcessor")
    image = {
        **common,
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    }
    video = {
        **common,
        "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"shortest_edge": QWEN3_VL_VIDEO_MIN_PIXELS, "longest_edge": QWEN3_VL_VIDEO_MAX_PIXELS},
        "do_sample_frames": False,
        "cap_pixels_per_frame": False,
        "max_video_tokens": QWEN3_VL_VIDEO_MAX_TOKENS,
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}
