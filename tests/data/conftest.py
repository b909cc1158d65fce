"""Synthetic videos whose frames encode their own index, so frame selection is checkable after decoding."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_tr1.data.video_writer import write_video

LEVEL0, LEVEL_STEP = 16, 6  # frame t has a flat 16x16 top-left block of grey level 16 + 6 t (t < 40)


def pattern_frames(num_frames: int, height: int = 64, width: int = 96) -> np.ndarray:
    """uint8 [T, H, W, 3]: a colour gradient, a square moving with t, and a flat index block top-left."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (x * 255 // (width - 1)).astype(np.uint8)
        frames[t, ..., 1] = (y * 255 // (height - 1)).astype(np.uint8)
        frames[t, ..., 2] = 128
        x0 = 16 + (2 * t) % (width - 32)
        frames[t, height // 2 : height // 2 + 12, x0 : x0 + 12] = (240, 40, 40)
        frames[t, :16, :16] = LEVEL0 + LEVEL_STEP * t
    return frames


def decode_all(path) -> tuple[np.ndarray, float]:
    """Every frame of ``path`` decoded with PyAV (uint8 ``[T, H, W, 3]``) and the stream's average frame rate."""
    import av

    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]), rate


def frame_index(frame) -> int:
    """The index a pattern frame encodes; ``frame`` is [H, W, 3] or [3, H, W] at the original 64x96 size."""
    frame = np.asarray(frame)
    if frame.shape[0] == 3:
        frame = frame.transpose(1, 2, 0)
    return int(round((float(np.median(frame[4:12, 4:12])) - LEVEL0) / LEVEL_STEP))


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """Paths of pattern videos: 30 frames at 10 fps (3 s) as h264/.mp4, vp9/.webm and mjpeg/.avi."""
    root = tmp_path_factory.mktemp("videos")
    frames = pattern_frames(30)
    out = {}
    for codec, ext in (("h264", "mp4"), ("vp9", "webm"), ("mjpeg", "avi")):
        out[codec] = root / f"pattern_{codec}.{ext}"
        write_video(out[codec], frames, fps=10.0, codec=codec)
    return out
