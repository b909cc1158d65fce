"""Annotation files -> ``Sample`` (one query on one video, ground truth in seconds).

Formats (``format="auto"`` sniffs them):
- ``temporal-r1``: a JSON list (or ``.jsonl``) of ``{"video", "problem", "solution", "video_length"?, "dataset"?,
  "id"?}``. ``video`` is relative to the data folder; ``solution`` is ``[start, end]`` as *fractions of the video
  length* (the seed's reward divides the answer by ``video_length`` before comparing), so seconds =
  fraction * ``video_length``, or * the container's ``total_frames / fps`` when the record has no ``video_length``
  (what qwen-vl-utils' frame sampling makes of it). ``video_length="frames"`` takes that container length even
  where the record has a ``video_length``, as the seed's training data loader does for Charades (``"auto"``, the
  default, does so for records of its ``charades_train`` dataset only; ``"json"`` never). ``problem`` is the
  question, kept verbatim (``Sample.problem``: the training prompt's text); the query is the quoted caption of
  ``Give the query: "...", when does...`` when it has that form, else the whole problem.
- ``lmms-tvg``: lmms-eval's temporal-grounding layout (the seed's test sets: ``lmms-lab/charades_sta``, its own
  ActivityNet set ``appletea2333/activity_tvg``), a JSON list (or ``.jsonl``) of ``{"video", "caption",
  "timestamp": [start, end]}`` in seconds, videos under the data folder.
- ``charades-sta``: text lines ``vid start end##sentence`` (seconds), videos ``<data_folder>/<vid>.mp4``.
- ``activitynet``: ActivityNet-Captions JSON ``{vid: {duration, timestamps: [[s, e], ...], sentences: [...]}}``;
  the video is ``<vid>`` with or without the ``v_`` prefix, ``.mp4`` / ``.mkv`` / ``.webm``, whichever exists.

Problems with the file itself (missing, empty, malformed JSON, unknown layout) always raise ``DataError``. Problems
with one record raise it too in strict mode; in lenient mode (training runs) the record is skipped and counted by
reason, and ``Annotations.summary()`` gives the one-line warning. With ``labels="verbatim"`` (evaluation) every
label is kept as written, as the seed's evaluation reads it (no clipping, no check against the duration, start >
end kept): such labels are counted in ``Annotations.notes`` instead, so ``n`` is the whole test set.
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

FORMATS = ("temporal-r1", "charades-sta", "activitynet", "lmms-tvg")
LABEL_MODES = ("checked", "verbatim")
VIDEO_LENGTHS = ("auto", "json", "frames")
CHARADES_TRAIN = "charades_train"  # the seed takes this dataset's video length from the decoded frames
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi")
END_TOLERANCE_S = 0.5  # an end up to this far past the duration is clipped to it (encoders round the length)
_QUERY_IN_PROBLEM = re.compile(r'\s*Give the query:\s*"(.*)",\s*when does the described content occur', re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One grounding query: ``video`` (absolute path), ``query``, ground truth ``start``/``end`` in seconds,
    ``duration`` in seconds (None if unknown), source ``dataset`` name and a stable ``id`` (``<video>#<k>``, the
    k-th query on that video in its file; ``<record id>#k`` where a Temporal-R1 record has an ``id``);
    ``problem``: a Temporal-R1 record's question text, verbatim (None in the other formats)."""

    video: str
    query: str
    start: float
    end: float
    duration: float | None
    dataset: str
    id: str
    problem: str | None = None
    task: str = "temporal_grounding"  # megatron_tr1.tasks: how it is prompted, rewarded and scored
    answer: str | None = None  # videoqa_mc: the correct option's letter (start/end: the clip, 0/0 = whole video)
    clip: tuple[float, float] | None = None  # seconds of the video the prompt shows (None: all of it)

    @property
    def gt(self) -> tuple[float, float]:
        return (self.start, self.end)


@dataclasses.dataclass
class Annotations:
    """Loaded samples plus the records skipped in lenient mode (``skipped``: reason -> count) out of ``total``, and
    (``labels="verbatim"``) the kept labels a checked load would refuse (``notes``: reason -> count)."""

    samples: list[Sample]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    total: int = 0
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def extend(self, other: "Annotations") -> None:
        self.samples.extend(other.samples)
        self.skipped.update(other.skipped)
        self.notes.update(other.notes)
        self.total += other.total

    def notes_summary(self) -> str:
        """``"kept as written: 2 start > end, 1 end past the duration"``, or ``""``."""
        return "kept as written: " + ", ".join(f"{n} {r}" for r, n in self.notes.most_common()) if self.notes else ""

    def summary(self) -> str:
        """``"skipped 3 of 1200 samples: 2 missing video, 1 start > end"``, or ``""`` when nothing was skipped."""
        return skipped_summary(self.skipped, self.total, "samples")


def skipped_summary(skipped: collections.Counter, total: int, noun: str) -> str:
    """``"skipped 3 of 1200 <noun>: 2 missing video, 1 start > end"``, or ``""`` when nothing was skipped."""
    if not skipped:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    return f"skipped {sum(skipped.values())} of {total} {noun}: {reasons}"


class BadRecord(Exception):
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
    problem: str | None = None
    frames_length: bool = False  # the duration is the container's frames / fps even where the record gives one


def load_annotations(
    path: str | Path, data_folder: str | Path, format: str = "auto", strict: bool = True, check_videos: bool = True,
    labels: str = "checked", video_length: str = "auto",
) -> Annotations:
    """Read one annotation file; videos are looked up under ``data_folder``.

    ``check_videos`` checks at load that each video exists (and reads its length from the container where the
    file gives none). Strict mode raises ``DataError`` on the first bad record; lenient mode skips and counts it.
    ``labels``: ``checked`` (training) or ``verbatim`` (evaluation); ``video_length``: see the module docstring.
    """
    if labels not in LABEL_MODES or video_length not in VIDEO_LENGTHS:
        raise ValueError(f"labels={labels!r} / video_length={video_length!r}: choose from {LABEL_MODES} / "
                         f"{VIDEO_LENGTHS}")
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
    reader = {"temporal-r1": _read_temporal_r1, "charades-sta": _read_charades, "activitynet": _read_activitynet,
              "lmms-tvg": _read_lmms_tvg}[fmt]
    out, seen, durations = Annotations([]), collections.Counter(), {}
    for raw in reader(path, text, folder):
        out.total += 1
        try:
            if isinstance(raw, BadRecord):
                raise raw
            if raw.fractions and video_length != "auto":
                raw.frames_length = video_length == "frames"
            sample = _finish(raw, check_videos, seen, durations, out.notes if labels == "verbatim" else None)
        except BadRecord as e:
            if strict:
                raise DataError(str(e)) from None
            out.skipped[e.reason] += 1
            continue
        out.samples.append(sample)
    if out.total == 0:
        raise DataError(f"annotation file {str(path)!r} has no records")
    return out


def sniff_format(path: Path, text: str) -> str:
    """``charades-sta`` for text lines, ``temporal-r1`` (or ``lmms-tvg`` when the first record has ``caption`` and
    ``timestamp``) for a JSON list or ``.jsonl``, ``activitynet`` for a JSON object of per-video objects. A leading
    UTF-8 byte-order mark is skipped."""
    body = text.lstrip("\ufeff \t\r\n")
    head = body[:1]
    if path.suffix == ".jsonl" or head == "[":
        first = re.match(r'\[?\s*\{[^{}]*\}', body)
        return "lmms-tvg" if first and '"caption"' in first.group(0) and '"timestamp"' in first.group(0) \
            else "temporal-r1"
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
        raise BadRecord("bad value", f"{where}: {field} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise BadRecord("bad value", f"{where}: {field} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise BadRecord("bad value", f"{where}: {field} must be finite, got {value!r}")
    return x


def _text(value, field: str, where: str) -> str:
    """A record's text field (query, video name): a non-empty string (a number is taken as its text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise BadRecord("bad value", f"{where}: {field} must be a non-empty string, got {value!r}; fix or drop the record")
    return str(value).strip()


def _span(value, field: str, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise BadRecord("bad value", f"{where}: {field} must be [start, end], got {value!r}")
    return _number(value[0], f"{field}[0]", where), _number(value[1], f"{field}[1]", where)


def _require(record, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise BadRecord("bad value", f"{where}: expected an object, got {type(record).__name__}")
    for name in fields:
        if name not in record:
            raise BadRecord("missing field", f"{where}: missing field {name!r} (has: {', '.join(sorted(record)) or 'none'})")


def _json_records(path: Path, text: str, layout: str) -> tuple[list, list[str]]:
    """The records of a JSON list or ``.jsonl`` file, and where each is (for messages)."""
    if path.suffix == ".jsonl":
        records, wheres = [], []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_load_json(path, line, line_no))
                wheres.append(f"{path}:{line_no}")
    else:
        records = _load_json(path, text)
        if not isinstance(records, list):
            raise DataError(f"{path}: {layout} annotations must be a JSON list of records, got {type(records).__name__}")
        wheres = [f"{path} record {i}" for i in range(len(records))]
    return records, wheres


def _read_temporal_r1(path: Path, text: str, folder: Path) -> Iterator[_Raw | BadRecord]:
    for record, where in zip(*_json_records(path, text, "Temporal-R1")):
        try:
            _require(record, ("video", "problem", "solution"), where)
            start, end = _span(record["solution"], "solution", where)
            length = record.get("video_length")
            duration = None if length is None else _number(length, "video_length", where)
            if duration is not None and duration <= 0:
                raise BadRecord("bad value", f"{where}: video_length must be > 0, got {length!r}")
            video = _text(record["video"], "video", where)
            problem = _text(record["problem"], "problem", where)
            match = _QUERY_IN_PROBLEM.match(problem)
            dataset = str(record.get("dataset") or path.stem)
            yield _Raw(where, [str(folder / video)], match.group(1) if match else problem,
                       start, end, duration, dataset, str(record.get("id") or Path(video).stem), fractions=True,
                       problem=str(record["problem"]), frames_length=dataset == CHARADES_TRAIN)
        except BadRecord as e:
            yield e


def _read_lmms_tvg(path: Path, text: str, folder: Path) -> Iterator[_Raw | BadRecord]:
    for record, where in zip(*_json_records(path, text, "lmms-eval temporal-grounding")):
        try:
            _require(record, ("video", "caption", "timestamp"), where)
            start, end = _span(record["timestamp"], "timestamp", where)
            video = _text(record["video"], "video", where)
            yield _Raw(where, [str(folder / video)], _text(record["caption"], "caption", where), start, end, None,
                       str(record.get("dataset") or path.stem), Path(video).stem)
        except BadRecord as e:
            yield e


def _read_charades(path: Path, text: str, folder: Path) -> Iterator[_Raw | BadRecord]:
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3 or not sentence.strip():
            yield BadRecord("bad value", f"{where}: expected 'vid start end##sentence', got {line.strip()!r}")
            continue
        vid = parts[0]
        try:
            start, end = _number(parts[1], "start", where), _number(parts[2], "end", where)
        except BadRecord as e:
            yield e
            continue
        yield _Raw(where, [str(folder / f"{vid}{ext}") for ext in VIDEO_EXTS], sentence.strip(), start, end, None,
                   "charades_sta", vid)


def _read_activitynet(path: Path, text: str, folder: Path) -> Iterator[_Raw | BadRecord]:
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
                raise BadRecord("bad value", f"{where}: timestamps and sentences must be lists of the same length")
        except BadRecord as e:
            yield e
            continue
        names = [vid, vid[2:]] if vid.startswith("v_") else [vid, f"v_{vid}"]
        videos = [str(folder / f"{name}{ext}") for ext in VIDEO_EXTS for name in names]
        for k, (stamp, sentence) in enumerate(zip(stamps, sentences)):
            try:
                start, end = _span(stamp, f"timestamps[{k}]", where)
                query = _text(sentence, f"sentences[{k}]", where)
            except BadRecord as e:
                yield e
                continue
            yield _Raw(f"{where} sentence {k}", videos, query, start, end, duration,
                       "activitynet", vid)


def _finish(raw: _Raw, check_videos: bool, seen: collections.Counter, durations: dict[str, float],
            notes: collections.Counter | None = None) -> Sample:
    """Validate one record, resolve its video and convert its span to seconds (``durations`` caches probes).
    With ``notes`` (verbatim labels) a label a checked load refuses is kept as written and counted there."""
    seen[raw.key] += 1
    sample_id = f"{raw.key}#{seen[raw.key] - 1}"
    video = next((v for v in raw.videos if os.path.isfile(v)), None)
    if video is None and check_videos:
        others = f" (also tried {len(raw.videos) - 1} other names)" if len(raw.videos) > 1 else ""
        raise BadRecord("missing video", f"{raw.where}: video file {raw.videos[0]!r} does not exist{others}")
    video = os.path.abspath(video or raw.videos[0])
    duration = raw.duration
    if (duration is None or raw.frames_length) and check_videos:
        if video not in durations:
            from megatron_tr1.data.video import probe_video  # here: video.py imports torch (seconds) at load

            try:
                info = probe_video(video)
            except DataError as e:
                raise BadRecord("unreadable video", f"{raw.where}: {e}") from None
            durations[video] = info.total_frames / info.video_fps
        duration = durations[video]
    start, end = raw.start, raw.end
    if notes is not None:
        return _verbatim(raw, video, duration, sample_id, notes)
    if raw.fractions:
        if max(start, end) > 1.0 + 1e-3:
            raise BadRecord("beyond duration", f"{raw.where}: solution [{start}, {end}] is past 1.0; Temporal-R1 JSON "
                                           "stores fractions of video_length in [0, 1]")
        if duration is None:
            raise BadRecord("unknown duration", f"{raw.where}: solution is in fractions of the video length, but the record "
                                            "has no video_length and the video was not read; add video_length")
        start, end = start * duration, min(end, 1.0) * duration
    if start < 0 or end < 0:
        raise BadRecord("negative time", f"{raw.where}: negative time in [{raw.start}, {raw.end}]")
    if start > end:
        raise BadRecord("start > end", f"{raw.where}: start {raw.start} > end {raw.end}")
    if start == end:
        raise BadRecord("empty span", f"{raw.where}: empty span [{raw.start}, {raw.end}] (start == end)")
    if duration is not None:
        if start >= duration or end > duration + END_TOLERANCE_S:
            raise BadRecord("beyond duration", f"{raw.where}: [{start:g}, {end:g}] s is beyond the video duration "
                                           f"{duration:g} s (tolerance {END_TOLERANCE_S} s)")
        end = min(end, duration)
    return Sample(video, raw.query, start, end, duration, raw.dataset, sample_id, raw.problem)


def _verbatim(raw: _Raw, video: str, duration: float | None, sample_id: str, notes: collections.Counter) -> Sample:
    """The label as written (fractions times the duration), counting what a checked load would refuse."""
    start, end = raw.start, raw.end
    if raw.fractions:
        if duration is None:
            raise BadRecord("unknown duration", f"{raw.where}: solution is in fractions of the video length, but the record "
                                            "has no video_length and the video was not read; add video_length")
        start, end = start * duration, end * duration
    if start > end:
        notes["start > end"] += 1
    elif start == end:
        notes["empty span"] += 1
    if min(start, end) < 0:
        notes["negative time"] += 1
    if duration is not None and max(start, end) > duration:
        notes["end past the duration"] += 1
    return Sample(video, raw.query, start, end, duration, raw.dataset, sample_id, raw.problem)
