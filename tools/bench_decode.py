"""Benchmark video decoding at 2 fps sampling: DALI vs PyAV vs decord, through ``data.video.sample_frames``.

Synthetic clips (a moving colour gradient with a sliding square) are written with ``data.video.write_video`` into
a temporary folder; each backend then samples them the way training does (``sample_frames(path, fps=2.0,
backend=...)``: ``smart_nframes`` frames at ``frame_indices``, resized to ``frame_size`` under Temporal-R1's
2048-visual-token budget). decord has no backend in ``data.video``; its row decodes the same indices with
``VideoReader.get_batch`` and resizes with ``data.video.resize_frames`` (same sizes, its own colour conversion).

Reported per (clip, decoder): decoded frames/s = sampled frames delivered per second of wall time, and real-time
factor = clip seconds / wall seconds; medians of ``--repeats`` after one warm-up call (which builds DALI's
pipeline).

GPU: 30/60/120 s clips at 480p and 720p, H.264; DALI ``mixed`` (NVDEC, frames stay on the GPU; timed to
``cuda.synchronize``), PyAV and decord on the CPU. CPU: toy sizes (10 s at 240p) and DALI's CPU decoder, which
reads VP9/VP8/MJPEG only: it runs on a VP9 copy of each clip, with PyAV on the same VP9 copy for comparison.

    python tools/bench_decode.py                       # GPU if there is one, else CPU toy sizes
    python tools/bench_decode.py --device cpu --durations 10 30 --resolutions 240p 480p

Writes ``benchmarks/decode_<device>.json`` and ``.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench_io import add_device_argument, check_device, machine_name, publish  # noqa: E402  (tools/ is on sys.path when run as a script)

RESOLUTIONS = {"240p": (240, 426), "360p": (360, 640), "480p": (480, 854), "720p": (720, 1280)}
SIZES = {"cuda": dict(durations=[30, 60, 120], resolutions=["480p", "720p"], source_fps=30, repeats=5),
         "cpu": dict(durations=[10], resolutions=["240p"], source_fps=30, repeats=3)}
EXT = {"h264": ".mp4", "vp9": ".webm"}
NOTES = {
    "cuda": "frames/s: sampled frames (2 fps, Temporal-R1 budget of 2048 visual tokens) delivered per wall second; "
            "RTF: clip seconds / wall seconds (higher is faster). dali = fn.decoders.video on device 'mixed' "
            "(NVDEC), synchronised; pyav and decord decode on the CPU.",
    "cpu": "Toy sizes, CPU. frames/s: sampled frames (2 fps, Temporal-R1 budget of 2048 visual tokens) delivered "
           "per wall second; RTF: clip seconds / wall seconds (higher is faster). DALI's CPU decoder reads "
           "VP9/VP8/MJPEG only, so dali-cpu runs on a VP9 copy of each clip and pyav on that same copy too "
           "(codec column); H.264 rows are PyAV (and decord when installed).",
}


def synthetic_clip(seconds: float, height: int, width: int, fps: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: a diagonal colour gradient scrolling right plus a white square sliding down."""
    t = int(round(seconds * fps))
    y = np.arange(height, dtype=np.int32)[:, None]
    x = np.arange(width, dtype=np.int32)[None, :]
    base = (x * 255 // max(width - 1, 1) + y * 128 // max(height - 1, 1))
    frames = np.empty((t, height, width, 3), dtype=np.uint8)
    side = max(height // 8, 2)
    for i in range(t):
        shift = i * 4
        frames[i, :, :, 0] = (base + shift) % 256
        frames[i, :, :, 1] = (255 - base + 2 * shift) % 256
        frames[i, :, :, 2] = (y * 255 // max(height - 1, 1) + shift // 2) % 256
        top = (i * 3) % (height - side)
        left = (i * 5) % (width - side)
        frames[i, top:top + side, left:left + side] = 255
    return frames


def decord_sample(path: str, fps: float = 2.0) -> torch.Tensor:
    """decord's twin of ``sample_frames``: same frame count, indices and final size."""
    import decord

    from megatron_tr1.data.video import frame_indices, frame_size, probe_video, resize_frames, smart_nframes

    info = probe_video(path)
    nframes = smart_nframes(info.total_frames, info.video_fps, fps)
    indices = frame_indices(info.total_frames, nframes)
    reader = decord.VideoReader(path, num_threads=0)
    frames = torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy()).permute(0, 3, 1, 2)
    return resize_frames(frames, *frame_size(frames.shape[-2], frames.shape[-1], nframes))


def decoders(device: str) -> list[tuple[str, str]]:
    """(decoder, codec) rows: DALI mixed on H.264 on a GPU, DALI cpu on VP9 (with PyAV on the same VP9) on CPU."""
    if device == "cuda":
        return [("dali-mixed", "h264"), ("pyav", "h264"), ("decord", "h264")]
    return [("pyav", "h264"), ("decord", "h264"), ("dali-cpu", "vp9"), ("pyav", "vp9")]


def measure(decoder: str, path: Path, repeats: int, device: str) -> tuple[float, int]:
    """(median wall seconds, sampled frames) of one 2 fps ``sample_frames`` call after a warm-up."""
    from megatron_tr1.data.video import sample_frames

    def once() -> int:
        if decoder == "decord":
            return len(decord_sample(str(path)))
        frames = sample_frames(path, fps=2.0, backend="dali" if decoder.startswith("dali") else "pyav").frames
        if frames.is_cuda:
            torch.cuda.synchronize()
        return len(frames)

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = once()
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


def available(decoder: str) -> str | None:
    """None when ``decoder`` can run here, else the reason (shown as the row's status)."""
    module = "decord" if decoder == "decord" else "nvidia.dali" if decoder.startswith("dali") else "av"
    return None if _importable(module) else "not installed"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (nvidia) is missing
        return False


def run(device: str, durations: list[float], resolutions: list[str], source_fps: int, repeats: int,
        workdir: Path) -> list[dict]:
    from megatron_tr1.data.video_writer import write_video

    rows = []
    for res in resolutions:
        height, width = RESOLUTIONS[res]
        for seconds in durations:
            rgb = synthetic_clip(seconds, height, width, source_fps)
            paths = {}
            for decoder, codec in decoders(device):
                clip = dict(resolution=res, height=height, width=width, clip_s=seconds, source_fps=source_fps,
                            codec=codec, decoder=decoder, sampled_frames=None, wall_s=None, frames_per_s=None,
                            rtf=None, status="ok")
                reason = available(decoder)
                if reason:
                    clip["status"] = reason
                    rows.append(clip)
                    print(f"{res} {seconds}s {codec} {decoder}: {reason}", file=sys.stderr)
                    continue
                if codec not in paths:
                    paths[codec] = workdir / f"clip_{res}_{seconds}s{EXT[codec]}"
                    start = time.perf_counter()
                    write_video(paths[codec], rgb, fps=source_fps, codec=codec)
                    print(f"wrote {paths[codec].name} ({paths[codec].stat().st_size / 2 ** 20:.1f} MiB) in "
                          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
                try:
                    wall, n = measure(decoder, paths[codec], repeats, device)
                    clip.update(sampled_frames=n, wall_s=wall, frames_per_s=n / wall, rtf=seconds / wall,
                                file_mib=paths[codec].stat().st_size / 2 ** 20)
                except Exception as e:  # a decoder failing on this machine is a result, not a crash
                    clip["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(clip)
                print(f"{res} {seconds}s {codec} {decoder}: {clip['status']} {clip['frames_per_s']} frames/s",
                      file=sys.stderr)
            del rgb
    return rows


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


HEADER = ["clip", "codec", "decoder", "sampled frames", "wall ms", "frames/s", "RTF", "status"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[f"{r['clip_s']:g} s {r['resolution']} ({r['width']}x{r['height']}@{r['source_fps']})", r["codec"],
             r["decoder"], _fmt(r["sampled_frames"], "d"), _fmt(r["wall_s"] and r["wall_s"] * 1e3, ".1f"),
             _fmt(r["frames_per_s"], ".1f"), _fmt(r["rtf"], ".1f"), r["status"]] for r in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_argument(parser)
    parser.add_argument("--durations", type=float, nargs="+", help="clip lengths in seconds (default: per device)")
    parser.add_argument("--resolutions", nargs="+", choices=sorted(RESOLUTIONS), help="default: per device")
    parser.add_argument("--source-fps", type=int, help="frame rate of the synthetic clips (default 30)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    cfg = dict(SIZES[args.device])
    cfg["durations"] = args.durations or cfg["durations"]
    cfg["resolutions"] = args.resolutions or cfg["resolutions"]
    cfg["source_fps"] = args.source_fps or cfg["source_fps"]
    cfg["repeats"] = args.repeats or cfg["repeats"]
    machine, slug = machine_name(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        rows = run(args.device, cfg["durations"], cfg["resolutions"], cfg["source_fps"], cfg["repeats"], Path(tmp))
    versions = {"torch": torch.__version__}
    for name, module in (("av", "av"), ("dali", "nvidia.dali"), ("decord", "decord")):
        if _importable(module):
            mod = __import__(module, fromlist=["__version__"])
            versions[name] = getattr(mod, "__version__", "?")
    title = (f"video decode at 2 fps: {machine}; median of {cfg['repeats']}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items()))
    publish(args.out, "decode", slug, title, NOTES[args.device], [(None, HEADER, table_rows(rows))],
            dict(machine=machine, versions=versions, config=cfg, notes=NOTES[args.device], results=rows),
            left=("clip", "codec", "decoder", "status"))

if __name__ == "__main__":
    main()
