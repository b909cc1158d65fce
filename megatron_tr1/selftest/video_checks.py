"""Video decoding: a generated clip whose frames carry their own index, written with ``data.video.write_video``.

The clip: 30 frames of 64x96 at 10 fps (a colour gradient, a moving red square, and a flat 16x16 block whose grey
level encodes the frame number), H.264 at CRF 10 (near-lossless).

- ``pyav_decode``: ``sample_frames(backend="pyav")`` with Temporal-R1's defaults must pick qwen-vl-utils' frames
  (2 fps of a 3 s clip: indices 0, 6, 12, 17, 23, 29), resize them to 56x84, and each decoded frame must show its
  own index; the pixels are compared with the source frames resized the same way: mean |difference| <= 4 grey
  levels (4:2:0 chroma blurs the square's edges; tests/data measure < 4 at full size).
- ``dali_mixed_decode`` (GPU + DALI): the same sampling with DALI's ``mixed`` decoder (NVDEC) against PyAV: the
  same indices, frames on the GPU, mean |difference| < 2 grey levels (NVDEC's own YUV -> RGB; tests/data).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from megatron_tr1.selftest.registry import Measured

FRAMES, HEIGHT, WIDTH, FPS = 30, 64, 96, 10.0
EXPECTED_INDICES = [0, 6, 12, 17, 23, 29]
LEVEL0, LEVEL_STEP = 16, 6


def pattern_frames() -> np.ndarray:
    """uint8 [T, H, W, 3]: gradient, moving square, flat index block top-left (grey 16 + 6 t)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(FRAMES):
        frames[t, ..., 0] = (x * 255 // (WIDTH - 1)).astype(np.uint8)
        frames[t, ..., 1] = (y * 255 // (HEIGHT - 1)).astype(np.uint8)
        frames[t, ..., 2] = 128
        x0 = 16 + (2 * t) % (WIDTH - 32)
        frames[t, HEIGHT // 2:HEIGHT // 2 + 12, x0:x0 + 12] = (240, 40, 40)
        frames[t, :16, :16] = LEVEL0 + LEVEL_STEP * t
    return frames


def frame_index(frame: torch.Tensor) -> int:
    """The index a decoded ``[3, H, W]`` pattern frame shows (its index block survives the 64x96 -> 56x84 resize)."""
    block = frame[:, 4:12, 4:12].float().cpu()
    return int(round((block.median().item() - LEVEL0) / LEVEL_STEP))


def _write_clip(folder: Path) -> tuple[Path, np.ndarray]:
    from megatron_tr1.data.video_writer import write_video

    frames = pattern_frames()
    path = folder / "pattern.mp4"
    write_video(path, frames, fps=FPS, codec="h264")
    return path, frames


def pyav_decode() -> Measured:
    from megatron_tr1.data.video import resize_frames, sample_frames

    with tempfile.TemporaryDirectory(prefix="tr1-selftest-") as tmp:
        path, source = _write_clip(Path(tmp))
        got = sample_frames(path, backend="pyav")
    indices = got.indices.tolist()
    src = torch.from_numpy(source[EXPECTED_INDICES]).permute(0, 3, 1, 2)
    want = resize_frames(src, *got.frames.shape[-2:])
    mean_err = (got.frames.float() - want.float()).abs().mean().item() if got.frames.shape == want.shape else 255.0
    shown = [frame_index(f) for f in got.frames]
    numbers = {"indices": indices, "shown_indices": shown, "shape": list(got.frames.shape),
               "mean_abs_err": mean_err, "sample_fps": got.sample_fps}
    problems = []
    if indices != EXPECTED_INDICES:
        problems.append(f"indices {indices} != {EXPECTED_INDICES}")
    if tuple(got.frames.shape) != (6, 3, 56, 84):
        problems.append(f"shape {list(got.frames.shape)} != [6, 3, 56, 84]")
    if shown != EXPECTED_INDICES:
        problems.append(f"frames show {shown}")
    value = f"{mean_err:.2f} grey levels mean" + (f"; {'; '.join(problems)}" if problems else "")
    return Measured(value, "<= 4 grey levels; frames 0,6,12,17,23,29 at 56x84",
                    not problems and mean_err <= 4.0, numbers)


def dali_mixed_decode() -> Measured:
    from megatron_tr1.data.video import sample_frames

    with tempfile.TemporaryDirectory(prefix="tr1-selftest-") as tmp:
        path, _ = _write_clip(Path(tmp))
        ref = sample_frames(path, backend="pyav")
        got = sample_frames(path, backend="dali")  # "mixed" (NVDEC) on a CUDA machine: data.video._pick_backend
    same_shape = got.frames.shape == ref.frames.shape
    mean_err = (got.frames.cpu().float() - ref.frames.float()).abs().mean().item() if same_shape else 255.0
    numbers = {"indices": got.indices.tolist(), "on_gpu": bool(got.frames.is_cuda), "mean_abs_err": mean_err,
               "shape": list(got.frames.shape)}
    ok = got.frames.is_cuda and got.indices.tolist() == ref.indices.tolist() and same_shape and mean_err < 2.0
    return Measured(f"{mean_err:.2f} grey levels" + ("" if got.frames.is_cuda else " (frames not on the GPU)"),
                    "< 2 grey levels vs PyAV; same frames, on the GPU", ok, numbers)
