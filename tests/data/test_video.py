"""Video writing and frame sampling against qwen-vl-utils' rules, on synthetic pattern videos."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from PIL import Image

from megatron_tr1.data.video import (
    MIN_PIXELS,
    TOTAL_PIXELS,
    VideoInfo,
    _decode_dali,
    _decode_pyav,
    _pick_backend,
    clip_frame_range,
    frame_indices,
    frame_size,
    max_pixels_per_frame,
    probe_video,
    resize_frames,
    sample_frames,
    smart_nframes,
    smart_resize,
)
from megatron_tr1.data.video_writer import write_video
from megatron_tr1.errors import DataError

from .conftest import decode_all, frame_index, pattern_frames


@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
def test_write_video_round_trip(videos, codec):
    decoded, rate = decode_all(videos[codec])
    src = pattern_frames(30)
    assert decoded.shape == src.shape and rate == 10.0
    assert [frame_index(f) for f in decoded] == list(range(30))
    err = np.abs(decoded.astype(int) - src)
    assert err[:, 2:14, 2:14].max() <= 4  # inside the flat index block: near-lossless
    assert err.mean() < 4.0  # 4:2:0 chroma blurs the sharp edges of the red square


@pytest.mark.parametrize("codec,ext", [("h264", "mp4"), ("vp9", "webm"), ("mjpeg", "avi"), ("vp9", "mkv")])
def test_write_video_is_byte_reproducible(tmp_path, codec, ext):
    frames = pattern_frames(6)
    write_video(tmp_path / f"a.{ext}", frames, fps=10.0, codec=codec)
    write_video(tmp_path / f"b.{ext}", frames, fps=10.0, codec=codec)
    assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()


def test_write_video_accepts_torch_and_fractional_fps(tmp_path):
    path = tmp_path / "t.mp4"
    write_video(path, torch.from_numpy(pattern_frames(4, 48, 64)), fps=29.97)
    decoded, rate = decode_all(path)
    assert decoded.shape == (4, 48, 64, 3) and abs(rate - 29.97) < 1e-6


@pytest.mark.parametrize(
    "name,frames,fps,codec,match",
    [
        ("odd.mp4", np.zeros((2, 63, 96, 3), np.uint8), 5.0, "h264", "even height and width, got 63x96"),
        ("x.mp4", np.zeros((2, 64, 96, 3), np.uint8), 5.0, "vp9", r"needs a file ending in \.webm or \.mkv"),
        ("x.mp4", np.zeros((2, 64, 96, 3), np.uint8), 5.0, "hevc", "unknown codec 'hevc'"),
        ("x.mp4", np.zeros((2, 64, 96, 3), np.float32), 5.0, "h264", "must be uint8"),
        ("x.mp4", np.zeros((0, 64, 96, 3), np.uint8), 5.0, "h264", "T>0"),
        ("x.mp4", np.zeros((2, 64, 96, 3), np.uint8), 0.0, "h264", "fps must be a positive number, got 0.0"),
    ],
)
def test_write_video_bad_input(tmp_path, name, frames, fps, codec, match):
    with pytest.raises(DataError, match=match):
        write_video(tmp_path / name, frames, fps=fps, codec=codec)


# ---- qwen-vl-utils arithmetic, against values worked out by hand ----

@pytest.mark.parametrize(
    "total,video_fps,kw,expected",
    [
        (30, 10.0, {}, 6),  # 3 s * 2 fps
        (300, 30.0, {}, 20),  # 10 s * 2 fps
        (121, 29.97, {}, 8),  # 4.04 s * 2 = 8.07 -> floor to even
        (10, 30.0, {}, 4),  # 0.67 -> raised to min_frames 4
        (3, 30.0, {}, 2),  # min_frames 4 capped at floor2(3) = 2
        (100_000, 30.0, {}, 768),  # capped at max_frames
        (1000, 10.0, {"min_frames": 5, "max_frames": 9}, 8),  # 200 -> floor2(9) = 8
        (1000, 10.0, {"min_frames": 5, "max_frames": 9, "fps": 0.01}, 6),  # 2 -> ceil2(5) = 6
        (50, 25.0, {"fps": 1.0}, 4),  # 2 s * 1 fps = 2 -> min 4
    ],
)
def test_smart_nframes(total, video_fps, kw, expected):
    assert smart_nframes(total, video_fps, **kw) == expected


@pytest.mark.parametrize(
    "args,match",
    [
        ((1, 10.0), "at least 2 frames to sample, this one has 1"),
        ((30, 10.0, 0.0), "fps must be > 0, got 0.0"),
        ((30, 10.0, -1.0), "fps must be > 0"),
        ((30, 10.0, 2.0, 10, 8), "min_frames=10, max_frames=8"),
    ],
)
def test_smart_nframes_bad_arguments(args, match):
    with pytest.raises(DataError, match=match):
        smart_nframes(*args)


def test_frame_indices_round_half_to_even():
    assert frame_indices(30, 6).tolist() == [0, 6, 12, 17, 23, 29]  # 0, 5.8, 11.6, 17.4, 23.2, 29
    assert frame_indices(4, 3).tolist() == [0, 2, 3]  # 1.5 rounds to 2
    assert frame_indices(6, 3).tolist() == [0, 2, 5]  # 2.5 rounds to 2


def test_max_pixels_per_frame():
    assert max_pixels_per_frame(2) == 768 * 28 * 28  # 1605632 / 2 * 2 capped at VIDEO_MAX_PIXELS
    assert max_pixels_per_frame(6) == pytest.approx(1605632 / 3)
    assert max_pixels_per_frame(768) == pytest.approx(1605632 / 384)  # 4181.3 > int(1.05 * 3136) = 3292
    assert max_pixels_per_frame(6, total_pixels=3 * 2352) == 3292  # 2352 < 3292: the floor wins


@pytest.mark.parametrize(
    "hw,kw,expected",
    [
        ((64, 96), {}, (56, 84)),  # round to 28: 2.29 -> 2, 3.43 -> 3
        ((360, 480), {"max_pixels": 1605632 / 30}, (196, 252)),  # 364x476 too big; beta 1.797: 200.4, 267.1 -> 7, 9
        ((64, 96), {"max_pixels": 3292}, (28, 56)),  # beta 1.366: 46.8, 70.3 -> 1, 2 (x28)
        ((20, 30), {"min_pixels": 3136}, (56, 84)),  # 28x28 too small; beta 2.286: 45.7, 68.6 -> ceil 2, 3
        ((64, 96), {"min_pixels": 8 * 784}, (84, 112)),  # 56x84 < 6272; beta 1.0104: 64.7, 97.0 -> ceil 3, 4
        ((10, 1990), {}, (28, 1988)),  # ratio 199 is allowed; height at least one factor
    ],
)
def test_smart_resize(hw, kw, expected):
    assert smart_resize(*hw, **kw) == expected


@pytest.mark.parametrize(
    "hwn,expected",
    [
        ((64, 96, 6), (56, 84)),  # budget 535210: smart_resize rounds only
        ((360, 640, 768), (56, 112)),  # budget 4181 -> 28x84 = 2352 < 3136; beta 1.155: 32.3, 97.0 -> ceil 2, 4
        ((360, 480, 60), (196, 252)),  # budget 1605632 / 30, as in test_smart_resize; above min_pixels
    ],
)
def test_frame_size_applies_the_processor_floor(hwn, expected):
    assert frame_size(*hwn) == expected


@pytest.mark.parametrize("hwn", [(360, 640, 768), (480, 640, 64), (1080, 1920, 16), (112, 112, 8)])
def test_frame_size_at_32_pixel_tokens_keeps_the_token_budget(hwn):
    """Qwen3-VL (patch 16 x merge 2): frames in multiples of 32 under budgets scaled by (32/28)^2, so a video gets
    about as many visual tokens as Qwen2.5-VL's 28-pixel frames under the same data.video numbers."""
    h, w, n = hwn
    h28, w28 = frame_size(h, w, n)
    h32, w32 = frame_size(h, w, n, factor=32)
    assert h32 % 32 == 0 and w32 % 32 == 0
    assert (h32, w32) == smart_resize(*smart_resize(h, w, 32, MIN_PIXELS * (32 / 28) ** 2, max_pixels_per_frame(
        n, TOTAL_PIXELS * (32 / 28) ** 2, MIN_PIXELS * (32 / 28) ** 2, 768 * 32 * 32)), 32, MIN_PIXELS * (32 / 28) ** 2,
        768 * 32 * 32)
    assert abs(h32 * w32 / 32 ** 2 - h28 * w28 / 28 ** 2) <= 0.25 * h28 * w28 / 28 ** 2 + 4


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(DataError, match=r"aspect ratio must be smaller than 200, got 201.0 \(10x2010\)"):
        smart_resize(10, 2010)


def test_resize_frames_is_torchvision_bicubic_antialias():
    """One float32 pass (torchvision's tensor path). PIL runs the same a=-0.5 antialiased cubic in two passes,
    rounding to uint8 in between; re-doing that in torch matches PIL to 1 level, which pins down the kernel."""
    y, x = np.mgrid[0:64, 0:96]
    img = np.stack([128 + 100 * np.sin(x / 5.0), 128 + 100 * np.cos(y / 7.0), (x * y) % 256], -1).astype(np.uint8)
    img[:, 40:] = 255
    img[:, 44:] = 0  # a sharp 4-px bar: bicubic overshoots below 0 and above 255 here
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    out = resize_frames(t, 56, 84)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 56, 84)

    def one_pass(a, size):
        return torch.nn.functional.interpolate(a, size, mode="bicubic", align_corners=False, antialias=True)

    raw = one_pass(t.float(), (56, 84))
    assert raw.min() < -0.5 and raw.max() > 255.5  # the overshoot is really there
    assert torch.equal(out, raw.clamp(0, 255).round().to(torch.uint8))  # clamped, not wrapped around

    two_pass = one_pass(one_pass(t.float(), (64, 84)).clamp(0, 255).round(), (56, 84)).clamp(0, 255).round()
    pil = np.asarray(Image.fromarray(img).resize((84, 56), Image.BICUBIC)).astype(int)
    assert np.abs(two_pass[0].permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1
    assert torch.equal(resize_frames(t, 64, 96), t)  # same size: untouched


# ---- sampling real files ----

@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
def test_sample_frames_picks_smart_nframes_indices(videos, codec):
    v = sample_frames(videos[codec], backend="pyav")
    assert v.total_frames == 30 and v.video_fps == 10.0 and v.duration == 3.0 and v.sample_fps == 2.0
    assert v.indices.tolist() == [0, 6, 12, 17, 23, 29]
    assert torch.allclose(v.timestamps, torch.tensor([0.0, 0.6, 1.2, 1.7, 2.3, 2.9], dtype=torch.float64))
    assert v.frames.dtype == torch.uint8 and v.frames.shape == (6, 3, 56, 84)
    # the index block (16x16 at 64x96 -> 14x14 at 56x84) still carries each frame's number
    assert [frame_index(f.numpy()) for f in v.frames] == v.indices.tolist()


def test_sample_frames_budget_arguments(videos):
    v = sample_frames(videos["vp9"], fps=4.0, total_pixels=6 * 2352, backend="pyav")
    assert v.indices.tolist() == frame_indices(30, 12).tolist() and v.sample_fps == 4.0
    assert v.frames.shape == (12, 3, 56, 84)  # 28x56 under the 3292 budget, raised back to min_pixels
    v = sample_frames(videos["vp9"], min_pixels=8 * 784, backend="pyav")
    assert v.frames.shape == (6, 3, 84, 112)  # upscaled to reach min_pixels
    v = sample_frames(videos["vp9"], fps=0.1, min_frames=3, backend="pyav")
    assert v.indices.tolist() == [0, 10, 19, 29]  # 0.3 frames -> ceil2(3) = 4


def _qwen_vl_utils_range(start, end, total_frames, video_fps):
    """qwen-vl-utils' ``calculate_video_frame_range`` transcribed (its ValueError as None)."""
    import math
    max_duration = total_frames / video_fps
    start_frame = math.ceil(max(0.0, min(start, max_duration)) * video_fps) if start is not None else 0
    end_frame = (min(math.floor(max(0.0, min(end, max_duration)) * video_fps), total_frames - 1)
                 if end is not None else total_frames - 1)
    return None if start_frame >= end_frame else (start_frame, end_frame)


@pytest.mark.parametrize("start, end", [(0.95, 2.05), (0.0, 3.0), (-1.0, 9.0), (1.0, None), (None, 1.5), (0.31, 0.4),
                                        (2.9, 3.5), (1.2, 1.2)])
def test_clip_frame_range_is_qwen_vl_utils(start, end):
    want = _qwen_vl_utils_range(start, end, 30, 10.0)
    if want is None:
        with pytest.raises(DataError, match="needs at least two frames"):
            clip_frame_range(30, 10.0, start, end, "v.mp4")
    else:
        assert clip_frame_range(30, 10.0, start, end, "v.mp4") == want


def test_sample_frames_cuts_the_clip(videos):
    v = sample_frames(videos["vp9"], backend="pyav", start=0.95, end=2.05)
    # frames 10..20 (11 frames, 1.1 s): smart_nframes(11) = 4 (min_frames), linspace(10, 20, 4).round()
    assert v.indices.tolist() == [10, 13, 17, 20] and v.sample_fps == pytest.approx(4 / 11 * 10.0)
    assert [frame_index(f.numpy()) for f in v.frames] == [10, 13, 17, 20]  # decoded where the clip is
    assert torch.allclose(v.timestamps, torch.tensor([1.0, 1.3, 1.7, 2.0], dtype=torch.float64))
    assert v.duration == 3.0 and v.total_frames == 30  # the file's, not the clip's
    whole = sample_frames(videos["vp9"], backend="pyav", start=None, end=None)
    assert whole.indices.tolist() == [0, 6, 12, 17, 23, 29]
    with pytest.raises(DataError, match="pattern_vp9.webm: the clip start=2.95 end=4.0 s holds frames 30..29"):
        sample_frames(videos["vp9"], backend="pyav", start=2.95, end=4.0)


def test_pyav_decodes_the_requested_frames(videos):
    early = _decode_pyav(videos["h264"], [3, 5, 11], lambda h, w: (h, w))  # stops after frame 11
    assert early.shape == (3, 3, 64, 96) and [frame_index(f.numpy()) for f in early] == [3, 5, 11]
    every = _decode_pyav(videos["vp9"], list(range(30)), lambda h, w: (56, 84))  # resized in chunks of 16 + 14
    assert every.shape == (30, 3, 56, 84) and [frame_index(f.numpy()) for f in every] == list(range(30))


def test_probe_counts_frames_without_container_metadata(videos):
    with av.open(str(videos["vp9"])) as c:
        assert c.streams.video[0].frames == 0  # WebM stores no frame count: packets are counted
    assert probe_video(videos["vp9"]) == VideoInfo(30, 10.0, 64, 96, "vp9")
    assert probe_video(videos["h264"]) == VideoInfo(30, 10.0, 64, 96, "h264")


def test_backend_selection(monkeypatch):
    assert _pick_backend("auto") == ("pyav", None)  # no CUDA here
    assert _pick_backend("dali") == ("dali", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _pick_backend("auto") == ("dali", "mixed")
    assert _pick_backend("pyav") == ("pyav", None)
    with pytest.raises(DataError, match="unknown video backend 'decord'"):
        _pick_backend("decord")


DALI_TOLERANCE = 2  # grey levels; measured max |DALI - PyAV| is 0 (same swscale conversion, see video.py)


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_matches_pyav(videos, codec):
    ref = sample_frames(videos[codec], backend="pyav")
    got = sample_frames(videos[codec], backend="dali")
    assert got.indices.tolist() == ref.indices.tolist() and got.frames.shape == ref.frames.shape
    assert (got.frames.int() - ref.frames.int()).abs().max().item() <= DALI_TOLERANCE
    full = _decode_dali(videos[codec], probe_video(videos[codec]), list(range(30)), "cpu")
    assert [frame_index(f.numpy()) for f in full] == list(range(30))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's mixed (NVDEC) decoder needs a CUDA GPU")
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_dali_gpu_matches_pyav(videos, codec):
    ref = sample_frames(videos[codec], backend="pyav")
    got = sample_frames(videos[codec], backend="auto")  # DALI, device "mixed"
    assert got.frames.is_cuda and got.indices.tolist() == ref.indices.tolist()
    assert [frame_index(f.cpu().numpy()) for f in got.frames] == ref.indices.tolist()
    assert (got.frames.cpu().float() - ref.frames.float()).abs().mean() < 2.0  # NVDEC's own YUV -> RGB


# ---- bad files ----

def _audio_only(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())


def _no_frames(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=10)
        s.width, s.height, s.pix_fmt = 64, 64, "yuvj420p"
        c.start_encoding()


def test_bad_files(tmp_path, videos):
    with pytest.raises(DataError, match=r"video file '.*missing\.mp4' does not exist"):
        sample_frames(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(DataError, match=r"junk\.mp4: cannot read video: .*Invalid data"):
        sample_frames(tmp_path / "junk.mp4")
    data = videos["mjpeg"].read_bytes()  # AVI header says 30 frames; half the data is gone
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.avi: cannot decode frame \d+: .*Invalid data"):
        sample_frames(tmp_path / "cut.avi", backend="pyav")
    _audio_only(tmp_path / "a.wav")
    with pytest.raises(DataError, match=r"a\.wav: no video stream in the file \(streams: \['audio'\]\)"):
        sample_frames(tmp_path / "a.wav")
    _no_frames(tmp_path / "empty.avi")
    with pytest.raises(DataError, match=r"empty\.avi: the video stream has no frames"):
        sample_frames(tmp_path / "empty.avi")
    write_video(tmp_path / "one.mp4", pattern_frames(1), fps=5.0)
    with pytest.raises(DataError, match="at least 2 frames to sample, this one has 1"):
        sample_frames(tmp_path / "one.mp4")
    with pytest.raises(DataError, match="only 30 decode"):  # container metadata claiming more than decodes
        _decode_pyav(videos["h264"], [0, 40], lambda h, w: (h, w))


def test_dali_errors(tmp_path, videos):
    with pytest.raises(DataError, match=r"DALI's CPU decoder cannot decode h264 .* use backend='pyav'.* GPU"):
        sample_frames(videos["h264"], backend="dali")
    data = videos["mjpeg"].read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.avi: DALI \(cpu\) cannot decode the video: .*Invalid data"):
        sample_frames(tmp_path / "cut.avi", backend="dali")
    with pytest.raises(DataError, match=r"DALI \(cpu\) cannot decode the video: .*out-of-bounds frame index 40"):
        _decode_dali(videos["vp9"], probe_video(videos["vp9"]), [0, 40], "cpu")  # an error, not a black frame
    assert sample_frames(videos["vp9"], backend="dali").frames.shape == (6, 3, 56, 84)  # usable again


def test_bad_arguments(videos):
    with pytest.raises(DataError, match="fps must be > 0, got 0"):
        sample_frames(videos["vp9"], fps=0)
    with pytest.raises(DataError, match="min_frames=8, max_frames=4"):
        sample_frames(videos["vp9"], min_frames=8, max_frames=4)
    with pytest.raises(DataError, match=r"total_pixels \(100\) must be >= min_pixels \(3136\)"):
        sample_frames(videos["vp9"], total_pixels=100)
