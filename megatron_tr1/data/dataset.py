"""Data configs (the seed's ``tvg.yaml``) -> a list of ``Sample``.

```yaml
datasets:
  - json_path: train.json          # annotation file; relative paths are relative to this YAML's folder
    data_folder: videos            # where the videos are
    sampling_strategy: all         # all | first:N | end:N | random:N | N% (= random:N%); N may be "N%" everywhere
    format: auto                   # auto | temporal-r1 | charades-sta | activitynet | lmms-tvg | mvbench
    task: auto                     # auto (from the format: mvbench -> videoqa_mc, else temporal_grounding) or a
                                   # task name (megatron_tr1.tasks.TASKS)
    video_length: auto             # Temporal-R1 JSON: auto | json | frames (the container's frames / fps; auto:
                                   # frames for the seed's charades_train records, as its data loader does)
```
Sampling is applied to the valid samples of each entry; ``random`` is deterministic for a seed. Percentages round
up (``ceil(N * len / 100)``), as the seed does. ``load_samples(..., labels="verbatim")`` (evaluation) keeps every
label as written and reports the ones a training load would skip (``data.annotations``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
from pathlib import Path

from megatron_tr1.config import from_dict, load_yaml
from megatron_tr1.data import videoqa
from megatron_tr1.data.annotations import FORMATS, VIDEO_LENGTHS, Annotations, Sample, load_annotations
from megatron_tr1.errors import ConfigError

log = logging.getLogger(__name__)

_STRATEGY = re.compile(r"(?:(first|end|random):)?(\d+)(%?)")


@dataclasses.dataclass
class DatasetEntry:
    """One annotation file and its video folder."""

    json_path: str
    data_folder: str = ""
    sampling_strategy: str = "all"
    format: str = "auto"
    video_length: str = "auto"
    task: str = "auto"


@dataclasses.dataclass
class DataConfig:
    """A list of datasets, concatenated in order."""

    datasets: list[DatasetEntry] = dataclasses.field(default_factory=list)


def parse_strategy(text: str) -> tuple[str, int | None, bool]:
    """``"all"`` -> ("all", None, False); ``"first:10"`` -> ("first", 10, False); ``"25%"`` -> ("random", 25, True).

    Raises ``ValueError`` with the accepted forms for anything else.
    """
    text = str(text).strip()
    if text == "all":
        return "all", None, False
    match = _STRATEGY.fullmatch(text)
    if not match or (match.group(1) is None and not match.group(3)):
        raise ValueError(f"sampling_strategy {text!r} is not one of: all, first:N, end:N, random:N, N% "
                         "(N a count, or a percentage like first:10%)")
    kind, number, percent = match.group(1) or "random", int(match.group(2)), bool(match.group(3))
    if percent and number > 100:
        raise ValueError(f"sampling_strategy {text!r}: a percentage must be at most 100%")
    return kind, number, percent


def resolve_data_config(cfg: DataConfig, base_dir: str | Path, where: str = "data config") -> DataConfig:
    """Make paths absolute against ``base_dir`` and check them and each sampling strategy (``ConfigError``)."""
    if not cfg.datasets:
        raise ConfigError(f"{where}: 'datasets' is empty; list at least one {{json_path, data_folder}}")
    base, entries = Path(base_dir), []
    for i, entry in enumerate(cfg.datasets):
        at = f"{where}: datasets[{i}]"
        json_path = (base / entry.json_path).resolve()
        if not json_path.is_file():
            raise ConfigError(f"{at}.json_path: {str(json_path)!r} does not exist")
        folder = (base / entry.data_folder).resolve() if entry.data_folder else json_path.parent
        if not folder.is_dir():
            raise ConfigError(f"{at}.data_folder: {str(folder)!r} is not a folder")
        try:
            parse_strategy(entry.sampling_strategy)
        except ValueError as e:
            raise ConfigError(f"{at}.{e}") from None
        if entry.format not in ("auto", *FORMATS, videoqa.FORMAT):
            raise ConfigError(f"{at}.format: {entry.format!r} is not one of auto, {', '.join(FORMATS)}, "
                              f"{videoqa.FORMAT}")
        if entry.video_length not in VIDEO_LENGTHS:
            raise ConfigError(f"{at}.video_length: {entry.video_length!r} is not one of {', '.join(VIDEO_LENGTHS)}")
        entries.append(dataclasses.replace(entry, json_path=str(json_path), data_folder=str(folder)))
    return DataConfig(entries)


def load_data_config(path: str | Path) -> DataConfig:
    """Read a data config YAML; relative paths are resolved against its folder."""
    if not str(path).strip():
        raise ConfigError("the data config path is empty; give the path of a data config YAML")
    path = Path(path)
    cfg = from_dict(DataConfig, load_yaml(path), where=str(path))
    return resolve_data_config(cfg, path.parent, where=str(path))


def _sample(samples: list[Sample], strategy: str, rng: random.Random) -> list[Sample]:
    kind, number, percent = parse_strategy(strategy)
    if kind == "all":
        return samples
    count = min(len(samples), math.ceil(number * len(samples) / 100) if percent else number)
    if kind == "first":
        return samples[:count]
    if kind == "end":
        return samples[len(samples) - count:]
    return [samples[i] for i in sorted(rng.sample(range(len(samples)), count))]


def load_samples(cfg: DataConfig, seed: int = 0, strict: bool = True, check_videos: bool = True,
                 labels: str = "checked") -> Annotations:
    """Load and sample every dataset of a resolved config (see ``load_data_config``).

    Strict mode raises ``DataError`` on the first bad record; lenient mode skips bad records and logs one warning
    with the counts per reason (also in the returned ``skipped``). ``labels="verbatim"``: every label kept as
    written, the ones a checked load refuses counted in ``notes`` (evaluation).
    """
    out = Annotations([])
    for i, entry in enumerate(cfg.datasets):
        if entry.format == videoqa.FORMAT or (entry.format == "auto" and videoqa.is_mvbench_file(entry.json_path)):
            loaded = videoqa.load_as_samples(entry.json_path, entry.data_folder, strict, check_videos)
        else:
            loaded = load_annotations(entry.json_path, entry.data_folder, entry.format, strict, check_videos,
                                      labels=labels, video_length=entry.video_length)
        if entry.task != "auto":  # the name is checked where tasks are known (megatron_tr1.tasks.check_tasks)
            loaded.samples = [dataclasses.replace(s, task=entry.task) for s in loaded.samples]
        rng = random.Random(f"{seed}:{i}")
        out.extend(Annotations(_sample(loaded.samples, entry.sampling_strategy, rng), loaded.skipped, loaded.total,
                               loaded.notes))
    if out.skipped:
        log.warning(out.summary())
    return out
