"""Annotation files -> ``Sample`` (one query on one video, ground truth in seconds).

Formats (``format="auto"`` sniffs them):
- ``temporal-r1``: a JSON list (or ``.jsonl``) of ``{"video", "problem", "solution", "video_length"?, "dataset"?,
  "id"?}``. ``video`` is relative to the data folder; ``solution`` is ``[start, end]`` as *fractions of the video
  length* (the seed's reward divides the answer by ``video_length`` before comparing), so seconds =
  fraction * ``video_length``, or * the container's ``total_frames / fps`` when the record has no ``video_length``
  (what qwen-vl-utils' frame sampling makes of it). ``problem`` is the question; the query is the quoted caption
  of ``Give the query: "...", when does...`` when it has that form, else the whole problem.
- ``charades-sta``: text lines ``vid start end##sentence`` (seconds), videos ``<data_folder>/<vid>.mp4``.
- ``activitynet``: ActivityNet-Captions JSON ``{vid: {duration, timestamps: [[s, e], ...], sentences: [...]}}``;
  the video is ``<vid>`` with or without the ``v_`` prefix, ``.mp4`` / ``.mkv`` / ``.webm``, whichever exists.

Problems with the file itself (missing, empty, malformed JSON, unknown layout) always raise ``DataError``. Problems
with one record raise it too in strict mode; in lenient mode (training runs) the record is skipped and counted by
reason, and ``Annotations.summary()`` gives the one-line warning.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

from megatron_tr1.errors import DataError

FORMATS = ("temporal-r1", "charades-sta", "activitynet")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi")
END_TOLERANCE_S = 0.5  # an end up to this far past the duration is clipped to it (encoders round the length)
_QUERY_IN_PROBLEM = re.compile(r'\s*Give the query:\s*"(.*)",\s*when does the described content occur', re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One grounding query: ``video`` (absolute path), ``query``, ground truth ``start``/``end`` in seconds,
    ``duration`` in seconds (None if unknown), source ``dataset`` name and a stable ``id`` (``<video>#<k>``, the
    k-th query on that video in its file; ``<record id>#k`` where a Temporal-R1 record has an ``id``)."""

    video: str
    query: str
    start: float
    end: float
    duration: float | None
    dataset: str
    id: str

    @property
    def gt(self) -> tuple[float, float]:
        return (self.start, self.end)


@dataclasses.dataclass
class Annotations:
    """Loaded samples plus the records skipped in lenient mode (``skipped``: reason -> count) out of ``total``."""

    samples: list[Sample]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    total: int = 0

    def extend(self, other: "Annotations") -> None:
        self.samples.extend(other.samples)
        self.skipped.update(other.skipped)
        self.total += other.total

    def summary(self) -> str:
        """``"skipped 3 of 1200 samples: 2 missing video, 1 start > end"``, or ``""`` when nothing was skipped."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"skipped {sum(self.skipped.values())} of {self.total} samples: {reasons}"


class _Skip(Exception):
    """One bad record: ``reason`` is the short count key, the message the full strict-mode error."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class _Raw:
    where: str  # "file:line" or "file record 3" for messages
    videos: list[str]  # candidate paths, the first is named when none exists
    query: str
    start: float
    end: float
    duration: float | None
    dataset: str
    key: str  # id prefix (video name)
    fractions: bool = False  # start/end are fractions of the duration


def load_annotations(
    path: str | Path, data_folder: str | Path, format: str = "auto", strict: bool = True, check_videos: bool = True
) -> Annotations:
    """Read one annotation file; videos are looked up under ``data_folder``.

    ``check_videos`` checks at load that each video exists (and reads its length from the container where the
    file gives none). Strict mode raises ``DataError`` on the first bad record; lenient mode skips and counts it.
    """
    path, folder = Path(path), Path(data_folder)
    if not path.is_file():
        raise DataError(f"annotation file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not content
    except UnicodeDecodeError as e:
        raise DataError(f"annotation file {str(path)!r} is not UTF-8 text (byte {e.start}); is it a video?") from None
    if not text.strip():
        raise DataError(f"annotation file {str(path)!r} is empty")
    fmt = sniff_format(path, text) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown annotation format {format!r}; choose from auto, {', '.join(FORMATS)}")
    reader = {"temporal-r1": _read_temporal_r1, "charades-sta": _read_charades, "activitynet": _read_activitynet}[fmt]
    out, seen, durations = Annotations([]), collections.Counter(), {}
    for raw in reader(path, text, folder):
        out.total += 1
        try:
            if isinstance(raw, _Skip):
                raise raw
            sample = _finish(raw, check_videos, seen, durations)
        except _Skip as e:
            if strict:
                raise DataError(str(e)) from None
            out.skipped[e.reason] += 1
            continue
        out.samples.append(sample)
    if out.total == 0:
        raise DataError(f"annotation file {str(path)!r} has no records")
    return out


def sniff_format(path: Path, text: str) -> str:
    """``charades-sta`` for text lines, ``temporal-r1`` for a JSON list or ``.jsonl``, ``activitynet`` for a
    JSON object of per-video objects. A leading UTF-8 byte-order mark is skipped."""
    head = text.lstrip("\ufeff \t\r\n")[:1]
    if path.suffix == ".jsonl" or head == "[":
        return "temporal-r1"
    if head == "{":
        return "activitynet"
    return "charades-sta"


def _load_json(path: Path, text: str, line_no: int = 0):
    """Parse JSON; errors name ``path:line:column`` (``line_no`` > 0: ``text`` is that line of a .jsonl file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no or e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None


def _number(value, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Skip("bad value", f"{where}: {field} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise _Skip("bad value", f"{where}: {field} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise _Skip("bad value", f"{where}: {field} must be finite, got {value!r}")
    return x


def _text(value, field: str, where: str) -> str:
    """A record's text field (query, video name): a non-empty string (a number is taken as its text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise _Skip("bad value", f"{where}: {field} must be a non-empty string, got {value!r}; fix or drop the record")
    return str(value).strip()


def _span(value, field: str, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Skip("bad value", f"{where}: {field} must be [start, end], got {value!r}")
    return _number(value[0], f"{field}[0]", where), _number(value[1], f"{field}[1]", where)


def _require(record, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise _Skip("bad value", f"{where}: expected an object, got {type(record).__name__}")
    for name in fields:
        if name not in record:
            raise _Skip("missing field", f"{where}: missing field {name!r} (has: {', '.join(sorted(record)) or 'none'})")


def _read_temporal_r1(path: Path, text: str, folder: Path) -> Iterator[_Raw | _Skip]:
    if path.suffix == ".jsonl":
        records, wheres = [], []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_load_json(path, line, line_no))
                wheres.append(f"{path}:{line_no}")
    else:
        records = _load_json(path, text)
        if not isinstance(records, list):
            raise DataError(f"{path}: Temporal-R1 annotations must be a JSON list of records, got {type(records).__name__}")
        wheres = [f"{path} record {i}" for i in range(len(records))]
    for record, where in zip(records, wheres):
        try:
            _require(record, ("video", "problem", "solution"), where)
            start, end = _span(record["solution"], "solution", where)
            length = record.get("video_length")
            duration = None if length is None else _number(length, "video_length", where)
            if duration is not None and duration <= 0:
                raise _Skip("bad value", f"{where}: video_length must be > 0, got {length!r}")
            video = _text(record["video"], "video", where)
            problem = _text(record["problem"], "problem", where)
            match = _QUERY_IN_PROBLEM.match(problem)
            yield _Raw(where, [str(folder / video)], match.group(1) if match else problem,
                       start, end, duration, str(record.get("dataset") or path.stem),
                       str(record.get("id") or Path(video).stem), fractions=True)
        except _Skip as e:
            yield e


def _read_charades(path: Path, text: str, folder: Path) -> Iterator[_Raw | _Skip]:
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3 or not sentence.strip():
            yield _Skip("bad value", f"{where}: expected 'vid start end##sentence', got {line.strip()!r}")
            continue
        vid = parts[0]
        try:
            start, end = _number(parts[1], "start", where), _number(parts[2], "end", where)
        except _Skip as e:
            yield e
            continue
        yield _Raw(where, [str(folder / f"{vid}{ext}") for ext in VIDEO_EXTS], sentence.strip(), start, end, None,
                   "charades_sta", vid)


def _read_activitynet(path: Path, text: str, folder: Path) -> Iterator[_Raw | _Skip]:
    data = _load_json(path, text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected ActivityNet-Captions JSON {{vid: {{duration, timestamps, sentences}}}}")
    for vid, record in data.items():
        where = f"{path} video {vid!r}"
        try:
            _require(record, ("duration", "timestamps", "sentences"), where)
            duration = _number(record["duration"], "duration", where)
            stamps, sentences = record["timestamps"], record["sentences"]
            if not isinstance(stamps, list) or not isinstance(sentences, list) or len(stamps) != len(sentences):
                raise _Skip("bad value", f"{where}: timestamps and sentences must be lists of the same length")
        except _Skip as e:
            yield e
            continue
        names = [vid, vid[2:]] if vid.startswith("v_") else [vid, f"v_{vid}"]
        videos = [str(folder / f"{name}{ext}") for ext in VIDEO_EXTS for name in names]
        for k, (stamp, sentence) in enumerate(zip(stamps, sentences)):
            try:
                start, end = _span(stamp, f"timestamps[{k}]", where)
                query = _text(sentence, f"sentences[{k}]", where)
            except _Skip as e:
                yield e
                continue
            yield _Raw(f"{where} sentence {k}", videos, query, start, end, duration,
                       "activitynet", vid)


def _finish(raw: _Raw, check_videos: bool, seen: collections.Counter, durations: dict[str, float]) -> Sample:
    """Validate one record, resolve its video and convert its span to seconds (``durations`` caches probes)."""
    seen[raw.key] += 1
    sample_id = f"{raw.key}#{seen[raw.key] - 1}"
    video = next((v for v in raw.videos if os.path.isfile(v)), None)
    if video is None and check_videos:
        others = f" (also tried {len(raw.videos) - 1} other names)" if len(raw.videos) > 1 else ""
        raise _Skip("missing video", f"{raw.where}: video file {raw.videos[0]!r} does not exist{others}")
    video = os.path.abspath(video or raw.videos[0])
    duration = raw.duration
    if duration is None and check_videos:
        if video not in durations:
            from megatron_tr1.data.video import probe_video  # here: video.py imports torch (seconds) at load

            try:
                info = probe_video(video)
            except DataError as e:
                raise _Skip("unreadable video", f"{raw.where}: {e}") from None
            durations[video] = info.total_frames / info.video_fps
        duration = durations[video]
    start, end = raw.start, raw.end
    if raw.fractions:
        if max(start, end) > 1.0 + 1e-3:
            raise _Skip("beyond duration", f"{raw.where}: solution [{start}, {end}] is past 1.0; Temporal-R1 JSON "
                                           "stores fractions of video_length in [0, 1]")
        if duration is None:
            raise _Skip("unknown duration", f"{raw.where}: solution is in fractions of the video length, but the record "
                                            "has no video_length and the video was not read; add video_length")
        start, end = start * duration, min(end, 1.0) * duration
    if start < 0 or end < 0:
        raise _Skip("negative time", f"{raw.where}: negative time in [{raw.start}, {raw.end}]")
    if start > end:
        raise _Skip("start > end", f"{raw.where}: start {raw.start} > end {raw.end}")
    if start == end:
        raise _Skip("empty span", f"{raw.where}: empty span [{raw.start}, {raw.end}] (start == end)")
    if duration is not None:
        if start >= duration or end > duration + END_TOLERANCE_S:
            raise _Skip("beyond duration", f"{raw.where}: [{start:g}, {end:g}] s is beyond the video duration "
                                           f"{duration:g} s (tolerance {END_TOLERANCE_S} s)")
        end = min(end, duration)
    return Sample(video, raw.query, start, end, duration, raw.dataset, sample_id)
