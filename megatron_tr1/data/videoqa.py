"""Multiple-choice VideoQA files (MVBench's layout) -> ``MCSample``.

MVBench ships one JSON file per sub-task: a list of records ``{"video", "question", "candidates": [option texts],
"answer": the correct option's text, "start"?, "end"?}`` (``start`` / ``end``: seconds bounding the clip, for the
sub-tasks cut from longer videos). Videos are relative to the data folder. The sub-task is the file's stem.

A file that is missing, not UTF-8, not JSON or not a list always raises ``DataError``. A bad record (a missing or
mistyped field, no ``candidates``, an ``answer`` that is none of them, ``start`` >= ``end``, a missing video) raises
it in strict mode, naming the file, record and value; in lenient mode it is skipped and counted by reason
(``MCLoad.summary()``).

``lettered_options`` writes the options as ``(A) text`` lines, the lettering lmms-eval's MVBench prompt uses and
the synthetic multiple-choice split's training prompt shares.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import string
from pathlib import Path

from megatron_tr1.data.annotations import BadRecord, skipped_summary
from megatron_tr1.errors import DataError

LETTERS = string.ascii_uppercase
FORMAT = "mvbench"


@dataclasses.dataclass(frozen=True)
class MCSample:
    """One multiple-choice question on one video: ``candidates`` (option texts, lettered A, B, ... in order),
    ``answer`` (the correct option's index), the clip bounds ``start`` / ``end`` in seconds (None: the whole
    video), ``dataset`` (the sub-task: the file's stem) and ``id`` (``<stem>#<record index>``)."""

    video: str
    question: str
    candidates: tuple[str, ...]
    answer: int
    dataset: str
    id: str
    start: float | None = None
    end: float | None = None

    @property
    def letter(self) -> str:
        """The correct option's letter."""
        return LETTERS[self.answer]


@dataclasses.dataclass
class MCLoad:
    """Loaded samples, the records skipped in lenient mode (``skipped``: reason -> count) out of ``total``."""

    samples: list[MCSample]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    total: int = 0

    def extend(self, other: "MCLoad") -> None:
        self.samples.extend(other.samples)
        self.skipped.update(other.skipped)
        self.total += other.total

    def summary(self) -> str:
        """``"skipped 2 of 40 records: 1 missing video, 1 no candidates"``, or ``""``."""
        return skipped_summary(self.skipped, self.total, "records")


def lettered_options(candidates) -> str:
    """``"(A) first\\n(B) second\\n"``: one line per option, lettered in order (lmms-eval's MVBench lettering)."""
    return "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"missing {field}", f"{where}: '{field}' must be a non-empty string, got {value!r}")
    return value


def _seconds(value, field: str, where: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise BadRecord("bad clip bounds", f"{where}: '{field}' must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _record(record, index: int, path: Path, folder: Path, check_videos: bool) -> MCSample:
    where = f"{path} record {index}"
    if not isinstance(record, dict):
        raise BadRecord("not a record", f"{where}: expected an object with video, question, candidates, answer; "
                                   f"got {type(record).__name__}")
    video, question = _text(record, "video", where), _text(record, "question", where)
    candidates = record.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise BadRecord("no candidates", f"{where}: 'candidates' must be a non-empty list of option texts, "
                                    f"got {candidates!r}")
    if len(candidates) > len(LETTERS) or not all(isinstance(c, str) for c in candidates):
        raise BadRecord("no candidates", f"{where}: 'candidates' must be at most {len(LETTERS)} strings, "
                                    f"got {candidates!r}")
    answer = record.get("answer")
    if answer not in candidates:  # lmms-eval letters the first candidate equal to the answer
        raise BadRecord("answer not among candidates", f"{where}: 'answer' {answer!r} is none of the candidates "
                                                  f"{candidates!r}")
    start = end = None
    if "start" in record or "end" in record:
        start, end = _seconds(record.get("start"), "start", where), _seconds(record.get("end"), "end", where)
        if start >= end:
            raise BadRecord("bad clip bounds", f"{where}: start {start} >= end {end}")
    full = folder / video
    if check_videos and not full.is_file():
        raise BadRecord("missing video", f"{where}: video {str(full)!r} does not exist (data_folder {str(folder)!r})")
    return MCSample(video=str(full), question=question, candidates=tuple(candidates),
                    answer=candidates.index(answer), dataset=path.stem, id=f"{path.stem}#{index}", start=start,
                    end=end)


def load_mvbench(path: str | Path, data_folder: str | Path, strict: bool = True, check_videos: bool = True) -> MCLoad:
    """Read one MVBench-layout file (see the module docstring); videos under ``data_folder``."""
    path, folder = Path(path), Path(data_folder)
    if not path.is_file():
        raise DataError(f"multiple-choice file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"multiple-choice file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of records (MVBench's layout), "
                        f"got {type(records).__name__ if records else 'nothing'}")
    out = MCLoad([], total=len(records))
    for i, record in enumerate(records):
        try:
            out.samples.append(_record(record, i, path, folder, check_videos))
        except BadRecord as e:
            if strict:
                raise DataError(f"{e} (or pass --lenient to skip such records)") from None
            out.skipped[e.reason] += 1
    return out


# The videoqa_mc task's own prompts (training, and `tr1 eval --task mvbench --protocol answer`): the grounding
# prompts' style, the answer an option letter.
SYSTEM_PROMPT_MC_THINK = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
    "<answer> </answer> tags: the letter of the best option only, e.g. <answer>B</answer>."
)
SYSTEM_PROMPT_MC_NO_THINK = (
    "You provide ONLY the final answer, without any reasoning process. The final answer MUST BE put in "
    "<answer> </answer> tags: the letter of the best option only, e.g. <answer>B</answer>."
)


def mc_user_text(question: str, candidates) -> str:
    """The videoqa_mc training prompt's user text: the question, then the lettered options."""
    return f"{question.strip()}\n{lettered_options(candidates)}".rstrip("\n")


def is_mvbench_file(path: str | Path) -> bool:
    """Whether ``path`` looks like MVBench's layout (``format: auto``): a ``.json`` list whose first record has
    ``candidates``. Unreadable files say False (the loader that reads them names the problem)."""
    path = Path(path)
    if path.suffix != ".json":
        return False
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(records, list) and bool(records) and isinstance(records[0], dict) and "candidates" in records[0]


def clip_of(sample: MCSample) -> tuple[float, float] | None:
    """The record's clip ``(start, end)`` seconds, None when it has no bounds (the whole video)."""
    return None if sample.start is None else (sample.start, sample.end)


def load_as_samples(path: str | Path, data_folder: str | Path, strict: bool = True, check_videos: bool = True):
    """An MVBench-layout file as training ``Sample``s of the ``videoqa_mc`` task (``data.annotations.Annotations``):
    the question as ``query``, ``mc_user_text`` as ``problem`` (the prompt's user text), the option letter as
    ``answer``, the clip bounds as ``clip`` (the prompt shows only those seconds) and ``start`` / ``end`` (0 / 0: the
    whole video)."""
    from megatron_tr1.data.annotations import Annotations, Sample

    loaded = load_mvbench(path, data_folder, strict, check_videos)
    samples = [Sample(video=s.video, query=s.question, start=s.start or 0.0, end=s.end or 0.0, duration=None,
                      dataset=s.dataset, id=s.id, problem=mc_user_text(s.question, s.candidates), task="videoqa_mc",
                      answer=s.letter, clip=clip_of(s)) for s in loaded.samples]
    return Annotations(samples, loaded.skipped, loaded.total)
