"""``tr1 make-synthetic``: a small temporal-grounding dataset whose answers are known exactly.

Each video is a tinted, noisy background with a grey square drifting around (a distractor that moves all the
time) and one event that happens during frames ``[k0, k1)``, 10-40 % of the video long: a red square appears, a
blue circle crosses the screen, ... The ground truth is ``[k0 / fps, k1 / fps]`` seconds, stored the Temporal-R1 way as
fractions of ``video_length = frames / fps``. Every video lasts ``duration`` seconds (a ``(low, high)`` range; 4 s
by default, which the demo uses: with 4-16 s its tiny model must also read the length from M-RoPE's temporal
positions, and does not learn to, see the README). Splits:
- ``train``: the four in-domain event kinds;
- ``test``: the same kinds on new videos (held out, in domain);
- ``ood``: three event kinds never seen in train (out of domain);
- ``pretrain``: four other kinds (orange square, cyan circle, purple screen, black bar), drawn like the four
  in-domain kinds in other colours: the demo's base stage learns grounding on these, as a real VLM is pretrained on
  other grounding data before Charades.
Every video draws its parameters from its own generator seeded by ``(seed, split, index)``, so a seed gives the same
annotation bytes and the same rendered frames, and adding videos does not change the earlier ones; ``workers``
processes write them in parallel with the same result (the H.264 encoder rounds a few pixels differently now and
then: ``data.video.write_video``).
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from megatron_tr1.data.synthetic_mc import write_mc_split
from megatron_tr1.data.video_writer import write_video
from megatron_tr1.errors import ConfigError

PROBLEM = 'Give the query: "{query}", when does the described content occur in the video?'
EXTENSIONS = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}
FPS_CHOICES = (4, 6, 8)
# event kind -> phrasings of its query
EVENTS = {
    "red_square": ("a red square appears", "the red square is visible", "a red box shows up on the screen"),
    "blue_circle": ("a blue circle moves across the screen", "the blue ball travels from left to right",
                    "a blue disk slides across the frame"),
    "green_screen": ("the screen turns green", "the background becomes green", "everything goes green"),
    "white_bar": ("a white bar grows", "the white bar gets longer", "a white line extends across the screen"),
    "dark_screen": ("the screen goes dark", "the picture turns black", "the lights go out"),
    "yellow_triangle": ("a yellow triangle appears", "the yellow triangle is visible", "a yellow triangle shows up"),
    "magenta_dot": ("a magenta dot falls down the screen", "the pink dot drops from top to bottom",
                    "a magenta ball falls"),
    "orange_square": ("an orange square appears", "the orange square is visible", "an orange box shows up"),
    "cyan_circle": ("a cyan circle moves across the screen", "the cyan ball travels from left to right",
                    "a cyan disk slides across the frame"),
    "purple_screen": ("the screen turns purple", "the background becomes purple", "everything goes purple"),
    "black_bar": ("a black bar grows", "the black bar gets longer", "a black line extends across the screen"),
}
# the pretraining kinds draw like these in-domain kinds, in another colour
LOOKS = {"orange_square": ("red_square", (240, 140, 20)), "cyan_circle": ("blue_circle", (30, 200, 220)),
         "purple_screen": ("green_screen", (110, 40, 150)), "black_bar": ("white_bar", (0, 0, 0))}
# split -> (index in the seed, event kinds)
SPLITS = {
    "train": (0, ("red_square", "blue_circle", "green_screen", "white_bar")),
    "test": (1, ("red_square", "blue_circle", "green_screen", "white_bar")),
    "ood": (2, ("dark_screen", "yellow_triangle", "magenta_dot")),
    "pretrain": (3, tuple(LOOKS)),
}
DURATION = (4.0, 4.0)  # seconds, every split
MC_SPLITS = ("train", "test", "ood")  # each also gets mc_<split>.yaml: multiple-choice questions on its videos
_POOL_MIN_VIDEOS = 256  # with workers=None, fewer videos are written in this process


def render(kind: str, num_frames: int, size: int, k0: int, k1: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[num_frames, size, size, 3]`` RGB frames in which event ``kind`` shows during frames ``[k0, k1)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(60, 140, 3).astype(np.float32) + rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    frames = np.broadcast_to(base, (num_frames, size, size, 3)).copy()
    phase = rng.uniform(0, 2 * np.pi)
    angle = phase + 2 * np.pi * np.arange(num_frames) / max(num_frames, 1)
    cx, cy = size / 2 + 0.3 * size * np.cos(angle), size / 2 + 0.3 * size * np.sin(angle)
    frames[(np.abs(xx - cx[:, None, None]) < 5) & (np.abs(yy - cy[:, None, None]) < 5)] = 170.0
    event = frames[k0:k1]  # a view: writing it draws the event
    progress = ((np.arange(k1 - k0) + 0.5) / (k1 - k0))[:, None, None]
    kind, colour = LOOKS.get(kind, (kind, None))
    if kind == "red_square":
        s = int(rng.integers(size // 5, size // 3))
        x0, y0 = rng.integers(0, size - s, 2)
        event[:, y0:y0 + s, x0:x0 + s] = colour or (220, 30, 30)
    elif kind == "blue_circle":
        r, y0 = int(rng.integers(7, 12)), float(rng.uniform(0.2, 0.8) * size)
        x = -r + progress * (size + 2 * r)
        event[(xx - x) ** 2 + (yy - y0) ** 2 <= r * r] = colour or (30, 60, 230)
    elif kind == "green_screen":
        event *= 0.3
        event += np.array(colour or (28, 140, 42), np.float32)
    elif kind == "white_bar":
        h = int(rng.integers(6, 11))
        y0 = int(rng.integers(0, size - h))
        event[(xx < progress * size) & (yy >= y0) & (yy < y0 + h)] = colour or 255.0
    elif kind == "dark_screen":
        event *= 0.15
    elif kind == "yellow_triangle":
        s = int(rng.integers(size // 4, size // 2))
        x0, y0 = rng.integers(0, size - s, 2)
        mask = (yy >= y0) & (yy < y0 + s) & (np.abs(xx - (x0 + s / 2)) <= (yy - y0) / 2)
        event[:, mask] = (230, 210, 30)
    elif kind == "magenta_dot":
        r, x0 = int(rng.integers(6, 10)), float(rng.uniform(0.2, 0.8) * size)
        y = -r + progress * (size + 2 * r)
        event[(xx - x0) ** 2 + (yy - y) ** 2 <= r * r] = (220, 40, 200)
    else:
        raise ValueError(f"unknown event kind {kind!r}; choose from {sorted(EVENTS)}")
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def make_video(split: str, index: int, seed: int, size: int,
               duration: tuple[float, float] = DURATION) -> tuple[dict, np.ndarray, int]:
    """Draw one video of ``split``: its Temporal-R1 record (``video`` left to the caller), frames and fps."""
    split_id, kinds = SPLITS[split]
    low, high = duration
    rng = np.random.default_rng([seed, split_id, index])
    kind = kinds[int(rng.integers(len(kinds)))]
    query = EVENTS[kind][int(rng.integers(len(EVENTS[kind])))]
    fps = FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
    num_frames = int(round(rng.uniform(low, high) * fps))
    length = int(rng.integers(max(2, round(0.1 * num_frames)), round(0.4 * num_frames) + 1))
    k0 = int(rng.integers(0, num_frames - length + 1))
    frames = render(kind, num_frames, size, k0, k0 + length, rng)
    record = {
        "problem": PROBLEM.format(query=query),
        "solution": [k0 / num_frames, (k0 + length) / num_frames],
        "video_length": num_frames / fps,
        "dataset": f"synthetic_{split}",
        "event": kind,
    }
    return record, frames, fps


def generate(out: str | Path, num: int, seed: int = 0, codec: str = "h264", size: int = 112,
             num_test: int | None = None, num_ood: int | None = None, num_pretrain: int = 0,
             duration: tuple[float, float] = DURATION, workers: int | None = None,
             progress: bool = True) -> dict[str, int]:
    """Write videos, ``{train,test,ood}.json``, ``{train,test,ood}.yaml``, ``meta.json`` and ``README.txt`` under
    ``out``; ``num_test``/``num_ood`` default to ``max(1, num // 4)``; ``pretrain.*`` only when ``num_pretrain``.
    ``workers`` processes (default: one per CPU, at most 8, from 256 videos up) encode the videos. Returns the
    number of videos per split."""
    if codec not in EXTENSIONS:
        raise ConfigError(f"--codec {codec!r} is not one of {', '.join(EXTENSIONS)}")
    quarter = max(1, num // 4)
    counts = {"train": num, "test": quarter if num_test is None else num_test,
              "ood": quarter if num_ood is None else num_ood}
    if num_pretrain:
        counts["pretrain"] = num_pretrain
    if num < 1 or min(counts.values()) < 0 or size < 32 or size % 2:
        raise ConfigError(f"need --num >= 1, --num-test/--num-ood/--num-pretrain >= 0 and an even --size >= 32, "
                          f"got {counts}, size={size}")
    duration = (float(duration[0]), float(duration[1]))
    if not 1.0 <= duration[0] <= duration[1]:
        raise ConfigError(f"--duration needs 1 <= LOW <= HIGH seconds, got {duration[0]:g} {duration[1]:g}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(split, i) for split, n in counts.items() for i in range(n)]
    records: dict[str, list[dict]] = {split: [] for split in counts}
    if workers is None:  # a pool's start-up (~1.5 s) outweighs its gain below a few hundred videos
        workers = (os.cpu_count() or 1) if len(jobs) >= _POOL_MIN_VIDEOS else 1
    workers = min(workers, 8, len(jobs))
    if multiprocessing.current_process().daemon:  # e.g. a test's rank worker: it may not start processes
        workers = 1
    write = functools.partial(_write_one, out / "videos", seed, size, codec, duration)
    # spawn, not fork: the caller (the trainer) may already run torch's thread pools
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        done = pool.imap(write, jobs, chunksize=16) if pool else map(write, jobs)
        for (split, _), record in zip(jobs, tqdm(done, total=len(jobs), desc="synthetic videos", unit="video",
                                                 disable=not progress)):
            records[split].append(record)
    finally:
        if pool:
            pool.terminate()
    for split, recs in records.items():
        (out / f"{split}.json").write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")
        config = {"datasets": [{"json_path": f"{split}.json", "data_folder": "videos", "sampling_strategy": "all"}]}
        (out / f"{split}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if split in MC_SPLITS and recs:  # multiple-choice questions on the same videos (data.synthetic_mc)
            write_mc_split(out, recs, split, seed)
    meta = {"seed": seed, "codec": codec, "size": size, "videos": counts, "fps_choices": list(FPS_CHOICES),
            "duration_s": list(duration), "splits": {s: {"event_kinds": list(k)} for s, (_, k) in SPLITS.items()},
            "queries": {k: list(v) for k, v in EVENTS.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (out / "README.txt").write_text(_README.format(**{"pretrain": 0} | counts, seed=seed, size=size, codec=codec,
                                                   lasts="-".join(sorted({f"{d:g}" for d in duration}, key=float))),
                                    encoding="utf-8")
    return counts


def _write_one(folder: Path, seed: int, size: int, codec: str, duration: tuple[float, float],
               job: tuple[str, int]) -> dict:
    """Draw and encode video ``job = (split, index)``; its record with ``video`` set (a pool worker's job)."""
    split, index = job
    record, frames, fps = make_video(split, index, seed, size, duration)
    name = f"{split}_{index:05d}{EXTENSIONS[codec]}"
    write_video(folder / name, frames, fps=fps, codec=codec)
    return {"video": name, **record}


_README = """Synthetic temporal-grounding data written by `tr1 make-synthetic` (seed {seed}, {size}x{size}, {codec}).
Every video lasts {lasts} s.

train.json  {train} videos, event kinds red_square, blue_circle, green_screen, white_bar
test.json   {test} new videos of the same kinds (held out, in domain)
ood.json    {ood} videos of unseen kinds dark_screen, yellow_triangle, magenta_dot (out of domain)
pretrain.json {pretrain} videos of other kinds orange_square, cyan_circle, purple_screen, black_bar (the demo's
            base stage pretrains on these; written only with --num-pretrain)

Each video has one event during a known span; a grey square drifts around all the time as a distractor.
Annotations are Temporal-R1 JSON: solution = [start, end] as fractions of video_length (seconds = fraction *
video_length). train.yaml / test.yaml / ood.yaml are data configs for `tr1 eval --data` and training.
meta.json lists every generator setting and query phrasing.
mc_train.yaml / mc_test.yaml / mc_ood.yaml: multiple-choice questions on the same videos in MVBench's layout
(mc_<split>/which_event.json: which event happens, 4 options; mc_<split>/when_event.json: in which third of the
video), task videoqa_mc: `tr1 eval --task mvbench --data mc_test.yaml`, and training data for that task.
"""


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num", type=int, default=64, help="training videos (default 64)")
    parser.add_argument("--num-test", type=int, default=None, help="in-domain test videos (default num/4)")
    parser.add_argument("--num-ood", type=int, default=None, help="out-of-domain videos (default num/4)")
    parser.add_argument("--num-pretrain", type=int, default=0,
                        help="videos of the pretraining event kinds (default 0: no pretrain split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", choices=list(EXTENSIONS), default="h264",
                        help="h264 (.mp4), vp9 (.webm), mjpeg (.avi)")
    parser.add_argument("--size", type=int, default=112, help="frame height and width in pixels (even)")
    parser.add_argument("--duration", type=float, nargs=2, default=list(DURATION), metavar=("LOW", "HIGH"),
                        help="video length range in seconds (default 4 4)")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoding processes (default: one per CPU, <= 8, from 256 videos up)")


def main(args) -> int:
    counts = generate(args.out, args.num, args.seed, args.codec, args.size, args.num_test, args.num_ood,
                      args.num_pretrain, tuple(args.duration), args.workers)
    pretrain = f", {counts['pretrain']} pretrain" if counts.get("pretrain") else ""
    print(f"wrote {counts['train']} train, {counts['test']} test, {counts['ood']} ood{pretrain} videos to {args.out}")
    print(f"next: tr1 eval --data {args.out}/test.yaml --baseline best-fixed --fit-data {args.out}/train.yaml")
    return 0
