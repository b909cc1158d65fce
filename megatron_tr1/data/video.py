"""Video files: sample frames from them the way qwen-vl-utils does (``data.video_writer`` writes them).

``sample_frames`` counts frames (container metadata, else by demuxing packets), picks indices with
``smart_nframes``, decodes only those, and resizes them to ``frame_size`` with torchvision's bicubic
antialiased tensor resize. Decoding runs on one of two backends, chosen in one place (``_pick_backend``):

* ``"pyav"`` (CPU): sequential decode that stops after the last needed frame; only needed frames are
  converted to RGB, and they are resized in chunks so full-resolution frames never pile up.
* ``"dali"``: ``fn.decoders.video(frames=indices)`` (it seeks with a frame index) with ``device="mixed"``
  (NVDEC) when CUDA is available, else ``device="cpu"``, which decodes VP8/VP9/MJPEG but not H.264.
  Frames stay on the decoding device.

YUV -> RGB uses interpolated chroma (swscale ``BILINEAR | FULL_CHR_H_INT | ACCURATE_RND``): PyAV then gives
the same pixels as DALI's CPU decoder, bit for bit. (torchvision/decord convert with nearest-neighbour
chroma, which differs only at sharp colour edges.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import torch

from megatron_tr1.errors import DataError

# qwen-vl-utils constants (vision_process.py).
IMAGE_FACTOR = 28  # patch 14 x spatial merge 2
FRAME_FACTOR = 2  # temporal patch
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MAX_PIXELS = 768 * 28 * 28  # per-frame cap
MAX_RATIO = 200
# Temporal-R1's video budget: 2048 visual tokens per video, at least 4 tokens per frame.
TOTAL_PIXELS = 2048 * 28 * 28
MIN_PIXELS = 4 * 28 * 28
BACKENDS = ("auto", "pyav", "dali")
_DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
_RESIZE_CHUNK = 16  # frames resized at once (bounds float32 memory at full resolution)


@dataclasses.dataclass
class VideoBudget:
    """Frame sampling and resizing (``sample_frames``'s arguments, qwen-vl-utils semantics); the config section
    ``data.video``. The defaults are the embedded demo's (8 frames of 56x56); ``temporal_r1()`` is the seed's
    (2 fps, up to 2048 visual tokens)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 8
    total_pixels: int = 8 * 56 * 56 // 2  # 8 frames of 56x56 for the demo's 112x112 videos
    min_pixels: int = 4 * 28 * 28

    def __post_init__(self):
        from megatron_tr1.errors import ConfigError

        for name in ("fps", "min_frames", "max_frames", "total_pixels", "min_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.min_frames > self.max_frames:
            raise ConfigError(f"min_frames={self.min_frames} > max_frames={self.max_frames}")
        if self.total_pixels < self.min_pixels:
            raise ConfigError(f"total_pixels={self.total_pixels} < min_pixels={self.min_pixels}")

    @classmethod
    def temporal_r1(cls) -> "VideoBudget":
        """Temporal-R1's budget: ``sample_frames``' defaults."""
        return cls(fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES, total_pixels=TOTAL_PIXELS,
                   min_pixels=MIN_PIXELS)


@dataclasses.dataclass
class VideoInfo:
    """What ``probe_video`` reads from the container without decoding."""

    total_frames: int
    video_fps: float
    height: int
    width: int
    codec: str


@dataclasses.dataclass
class VideoFrames:
    """Frames sampled from one video, and where they sit in it.

    ``frames`` is uint8 ``[T, 3, H, W]`` (H, W multiples of 28) on the decoding device; ``indices`` (long
    ``[T]``) are the frame numbers picked and ``timestamps`` (float64 ``[T]``) their times,
    ``index / video_fps`` seconds. ``sample_fps = T / total_frames * video_fps`` and
    ``duration = total_frames / video_fps`` seconds, as qwen-vl-utils computes them.
    """

    frames: torch.Tensor
    timestamps: torch.Tensor
    indices: torch.Tensor
    sample_fps: float
    duration: float
    total_frames: int
    video_fps: float


def smart_nframes(
    total_frames: int, video_fps: float, fps: float = FPS, min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """Number of frames to sample: ``duration * fps`` clamped to ``[ceil2(min_frames), floor2(min(max_frames,
    total_frames))]`` and floored to even (qwen-vl-utils ``smart_nframes``). DataError if fewer than 2."""
    if not fps > 0:
        raise DataError(f"fps must be > 0, got {fps!r}")
    if not 1 <= min_frames <= max_frames:
        raise DataError(f"need 1 <= min_frames <= max_frames, got min_frames={min_frames}, max_frames={max_frames}")
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    nframes = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
    nframes = math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise DataError(f"a video needs at least {FRAME_FACTOR} frames to sample, this one has {total_frames}")
    return nframes


def frame_indices(total_frames: int, nframes: int, first: int = 0, last: int | None = None) -> torch.Tensor:
    """``linspace(first, last, nframes).round()`` in float32 (``last`` defaults to ``total_frames - 1``), as
    qwen-vl-utils (round half to even)."""
    return torch.linspace(first, total_frames - 1 if last is None else last, nframes).round().long()


def clip_frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None,
                     where: str = "video") -> tuple[int, int]:
    """The first and last frame of the clip ``[start, end]`` seconds (None: the video's own bound), as qwen-vl-utils'
    ``calculate_video_frame_range`` (``video_start`` / ``video_end``): times clamped to the video, the first frame
    rounded up, the last rounded down; DataError when the clip holds fewer than two frames."""
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1) if end is not None \
        else total_frames - 1
    if first >= last:
        raise DataError(f"{where}: the clip start={start} end={end} s holds frames {first}..{last} of "
                        f"{total_frames} ({duration:.2f} s at {video_fps:g} fps); it needs at least two frames")
    return first, last


def max_pixels_per_frame(nframes: int, total_pixels: float = TOTAL_PIXELS, min_pixels: float = MIN_PIXELS,
                         max_pixels: float = VIDEO_MAX_PIXELS) -> float:
    """Per-frame pixel cap: ``max(min(max_pixels, total_pixels / nframes * 2), int(1.05 * min_pixels))``."""
    return max(min(max_pixels, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: float = MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with ``min_pixels <= h * w <= max_pixels`` and the
    aspect ratio kept as closely as possible (qwen-vl-utils ``smart_resize``)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise DataError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
            f" ({height}x{width})"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_size(
    height: int, width: int, nframes: int, total_pixels: int = TOTAL_PIXELS, min_pixels: int = MIN_PIXELS,
    factor: int = IMAGE_FACTOR,
) -> tuple[int, int]:
    """Final frame size of a video sampled to ``nframes`` frames: qwen-vl-utils' ``smart_resize`` under the
    ``max_pixels_per_frame`` budget, then the HF processor's own ``smart_resize`` with the same
    ``min_pixels``. The second is a no-op unless the first lands below ``min_pixels``, which the floor in
    ``smart_resize`` allows on long videos (768 frames of 360x640: 28x84, which the processor makes 56x112).
    One resize straight to the final size stands in for the reference pipeline's two.

    ``factor`` is the model's pixels per visual token side (Qwen2.5-VL 28, Qwen3-VL 32: patch x merge). The pixel
    budgets are given at 28 x 28 pixels per token, as qwen-vl-utils states them for Qwen2.5-VL, and scaled by
    ``(factor / 28)^2`` so that they mean the same numbers of visual tokens for every family."""
    scale = (factor / IMAGE_FACTOR) ** 2
    total_pixels, min_pixels = total_pixels * scale, min_pixels * scale
    budget = max_pixels_per_frame(nframes, total_pixels, min_pixels, VIDEO_MAX_PIXELS * scale)
    first = smart_resize(height, width, factor, min_pixels, budget)
    return smart_resize(*first, factor, min_pixels, VIDEO_MAX_PIXELS * scale)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 ``[T, 3, H, W]``, as torchvision's ``transforms.functional.resize``
    does on a uint8 tensor: float32 ``interpolate(align_corners=False, antialias=True)``, clamp, round."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    out = []
    for part in frames.split(_RESIZE_CHUNK):
        x = torch.nn.functional.interpolate(
            part.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        out.append(x.clamp_(0, 255).round_().to(torch.uint8))
    return torch.cat(out)


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count (container ``nb_frames``, else demuxed packets), frame rate, size and codec of the first
    video stream. DataError for a missing, unreadable or empty file, or one without a video stream."""
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video file {str(path)!r} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = [s.type for s in container.streams] or "none"
                raise DataError(f"{path}: no video stream in the file (streams: {kinds})")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            info = VideoInfo(total, float(rate or 0), stream.codec_context.height, stream.codec_context.width,
                             stream.codec_context.name)
    except av.FFmpegError as e:
        raise DataError(f"{path}: cannot read video: {e}") from e
    if info.total_frames == 0:
        raise DataError(f"{path}: the video stream has no frames")
    if not info.video_fps > 0:
        raise DataError(f"{path}: the video stream has no frame rate; re-mux it with one (ffmpeg -r)")
    return info


def sample_frames(
    path: str | Path, fps: float = FPS, min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES,
    total_pixels: int = TOTAL_PIXELS, min_pixels: int = MIN_PIXELS, backend: str = "auto",
    start: float | None = None, end: float | None = None, factor: int = IMAGE_FACTOR,
) -> VideoFrames:
    """Sample ``smart_nframes`` frames at ``frame_indices``, resized to ``frame_size`` (qwen-vl-utils
    ``fetch_video`` followed by the HF processor's resize). ``backend``: "auto" (DALI when CUDA and DALI are
    available, else PyAV), "pyav" or "dali". ``start`` / ``end`` (seconds) cut a clip first (qwen-vl-utils'
    ``video_start`` / ``video_end``: ``clip_frame_range``); the frame count and ``sample_fps`` follow the clip's
    length, ``timestamps`` stay times in the whole video. ``factor``: pixels per visual token side
    (``frame_size``)."""
    backend, device = _pick_backend(backend)
    if total_pixels < min_pixels:
        raise DataError(f"total_pixels ({total_pixels}) must be >= min_pixels ({min_pixels})")
    info = probe_video(path)
    first, last = clip_frame_range(info.total_frames, info.video_fps, start, end, str(path))
    count = last - first + 1
    try:
        nframes = smart_nframes(count, info.video_fps, fps, min_frames, max_frames)
    except DataError as e:
        raise DataError(f"{path}: {e}; drop this video from the annotations or re-encode it") from None
    indices = frame_indices(info.total_frames, nframes, first, last)

    def size_of(height: int, width: int) -> tuple[int, int]:
        return frame_size(height, width, nframes, total_pixels, min_pixels, factor)

    if backend == "pyav":
        frames = _decode_pyav(Path(path), indices.tolist(), size_of)
    else:
        frames = _decode_dali(Path(path), info, indices.tolist(), device)
        frames = resize_frames(frames, *size_of(*frames.shape[-2:]))
    return VideoFrames(
        frames=frames,
        timestamps=indices.double() / info.video_fps,
        indices=indices,
        sample_fps=nframes / count * info.video_fps,
        duration=info.total_frames / info.video_fps,
        total_frames=info.total_frames,
        video_fps=info.video_fps,
    )


def _pick_backend(backend: str) -> tuple[str, str | None]:
    """The one place that maps ``backend`` to (decoder, DALI device): DALI "mixed" with CUDA, else "cpu"."""
    if backend not in BACKENDS:
        raise DataError(f"unknown video backend {backend!r}; choose from {list(BACKENDS)}")
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "dali" if cuda and _dali_importable() else "pyav"
    if backend == "dali" and not _dali_importable():
        raise DataError("video backend 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use 'pyav')")
    return backend, ("mixed" if cuda else "cpu") if backend == "dali" else None


def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


_THREADED_PIXELS = 1 << 24  # decoded pixels above which PyAV decodes with frame threads


def _rgb_tensor(frame, reformatter) -> torch.Tensor:
    """``frame`` as RGB, uint8 ``[3, H, W]``. One ``VideoReformatter`` per video keeps its swscale context: a fresh
    one per frame (``frame.reformat``) costs 7x as much (1.8 vs 0.27 ms for 112x112), the same pixels."""
    import av

    flags = av.video.reformatter.Interpolation
    rgb = reformatter.reformat(frame, format="rgb24",
                               interpolation=flags.BILINEAR | flags.FULL_CHR_H_INT | flags.ACCURATE_RND)
    return torch.from_numpy(rgb.to_ndarray()).permute(2, 0, 1)


def _decode_pyav(path: Path, indices: list[int], size_of) -> torch.Tensor:
    """Decode frames ``indices`` (sorted) in one sequential pass, resizing to ``size_of(H, W)`` in chunks."""
    import av

    wanted = set(indices)
    picked: dict[int, torch.Tensor] = {}
    pending: list[int] = []
    decoded = 0

    def flush():
        batch = torch.stack([picked[i] for i in pending])
        for i, frame in zip(pending, resize_frames(batch, *size_of(*batch.shape[-2:]))):
            picked[i] = frame
        pending.clear()

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if (stream.frames or 1 << 20) * stream.codec_context.width * stream.codec_context.height >= _THREADED_PIXELS:
                stream.thread_type = "AUTO"  # frame threads pay off on long videos; on a 4 s clip they double the cost
            reformatter = av.video.reformatter.VideoReformatter()
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 in wanted:
                    picked[decoded - 1] = _rgb_tensor(frame, reformatter)
                    pending.append(decoded - 1)
                    if len(pending) == _RESIZE_CHUNK:
                        flush()
                if decoded > indices[-1]:
                    break
    except av.FFmpegError as e:
        raise DataError(f"{path}: cannot decode frame {decoded}: {e}") from e
    if decoded <= indices[-1]:
        raise DataError(
            f"{path}: the container reports {indices[-1] + 1} frames but only {decoded} decode; "
            "re-mux or re-encode the file (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4)"
        )
    if pending:
        flush()
    return torch.stack([picked[i] for i in indices])


@functools.lru_cache(maxsize=None)
def _dali_pipeline(device: str, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device=device, frames=frames, pad_mode="none")  # no silent black frames

    pipe = pipeline()
    pipe.build()
    return pipe


def _decode_dali(path: Path, info: VideoInfo, indices: list[int], device: str) -> torch.Tensor:
    """Decode frames ``indices`` with DALI on ``device`` ("cpu" or "mixed"); uint8 ``[T, 3, H, W]``."""
    if device == "cpu" and info.codec not in _DALI_CPU_CODECS:
        raise DataError(
            f"{path}: DALI's CPU decoder cannot decode {info.codec} (only {', '.join(_DALI_CPU_CODECS)}); "
            "use backend='pyav' here, or run on a GPU where DALI decodes it with NVDEC"
        )
    pipe = _dali_pipeline(device, torch.cuda.current_device() if device == "mixed" else None)
    pipe.feed_input("encoded", [np.fromfile(path, dtype=np.uint8)])
    pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
    try:
        (out,) = pipe.run()
    except RuntimeError as e:
        _dali_pipeline.cache_clear()  # DALI invalidates a pipeline after an error
        raise DataError(f"{path}: DALI ({device}) cannot decode the video: {_dali_reason(e)}") from e
    frames = torch.from_dlpack(out.as_tensor())[0].clone()  # DALI reuses its output buffers
    return frames.permute(0, 3, 1, 2).contiguous()


def _dali_reason(error: RuntimeError) -> str:
    """The decoder's own words from DALI's multi-line pipeline error (the line after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines()]
    after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else lines
    return next((line for line in after if line), "unknown error")
