import json
import logging
from pathlib import Path

import pytest

from megatron_tr1.config import from_dict, load_yaml
from megatron_tr1.data.annotations import FORMATS
from megatron_tr1.data.dataset import DataConfig, load_data_config, load_samples, parse_strategy
from megatron_tr1.errors import ConfigError, DataError


@pytest.fixture
def tree(tmp_path):
    """conf/data.yaml pointing at ann/a.json (50 records) and ann/b.txt (2 lines), without videos."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "ann").mkdir()
    (tmp_path / "vids").mkdir()
    records = [{"video": f"v{i}.mp4", "problem": f"q{i}", "solution": [0.1, 0.2], "video_length": 10} for i in range(50)]
    (tmp_path / "ann" / "a.json").write_text(json.dumps(records))
    (tmp_path / "ann" / "b.txt").write_text("x 1 2##one\nx 2 1##start after end\n")
    return tmp_path


def _config(tree, *entries):
    lines = ["datasets:"]
    for entry in entries:
        lines += [f"  - {k}: {v}" if i == 0 else f"    {k}: {v}" for i, (k, v) in enumerate(entry.items())]
    path = tree / "conf" / "data.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_relative_paths_resolve_against_the_yaml_folder(tree, monkeypatch):
    path = _config(tree, {"json_path": "../ann/a.json", "data_folder": "../vids", "sampling_strategy": "first:3"},
                   {"json_path": "../ann/b.txt"})
    monkeypatch.chdir(tree / "ann")
    cfg = load_data_config(path)
    assert cfg.datasets[0].json_path == str(tree / "ann" / "a.json")
    assert cfg.datasets[0].data_folder == str(tree / "vids")
    assert cfg.datasets[1].data_folder == str(tree / "ann")  # default: the annotation file's folder
    samples = load_samples(cfg, check_videos=False, strict=False).samples
    assert [s.query for s in samples] == ["q0", "q1", "q2", "one"]
    assert samples[0].video == str(tree / "vids" / "v0.mp4")


@pytest.mark.parametrize(
    "text, parsed",
    [("all", ("all", None, False)), ("first:10", ("first", 10, False)), ("end:3", ("end", 3, False)),
     ("random:7", ("random", 7, False)), ("25%", ("random", 25, True)), ("first:10%", ("first", 10, True))],
)
def test_parse_strategy(text, parsed):
    assert parse_strategy(text) == parsed


@pytest.mark.parametrize("bad", ["some", "first", "first:", "random:-1", "10", "150%", "middle:3"])
def test_bad_strategies_are_rejected(bad):
    with pytest.raises(ValueError, match="first:N, end:N, random:N, N%|at most 100%"):
        parse_strategy(bad)


def _queries(tree, strategy, seed=0):
    cfg = load_data_config(_config(tree, {"json_path": "../ann/a.json", "sampling_strategy": strategy}))
    return [s.query for s in load_samples(cfg, seed=seed, check_videos=False).samples]


def test_sampling_strategies(tree):
    assert _queries(tree, "first:2") == ["q0", "q1"]
    assert _queries(tree, "end:2") == ["q48", "q49"]
    assert len(_queries(tree, "first:500")) == 50
    assert len(_queries(tree, "'3%'")) == 2  # ceil(3 * 50 / 100), as the seed rounds
    picked = _queries(tree, "random:5", seed=1)
    assert len(set(picked)) == 5 and picked == _queries(tree, "random:5", seed=1)
    assert picked != _queries(tree, "random:5", seed=2)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"json_path": "../ann/nowhere.json"}, r"data\.yaml: datasets\[0\]\.json_path: '.*nowhere\.json' does not exist"),
        ({"json_path": "../ann/a.json", "data_folder": "../none"}, r"datasets\[0\]\.data_folder: '.*none' is not a folder"),
        ({"json_path": "../ann/a.json", "sampling_strategy": "half"}, r"datasets\[0\]\.sampling_strategy 'half' is not"),
        ({"json_path": "../ann/a.json", "format": "csv"}, r"datasets\[0\]\.format: 'csv' is not one of"),
        ({"json_path": "../ann/a.json", "jsonpath": "x"}, r"unknown key\(s\) 'jsonpath'"),
    ],
)
def test_config_errors_name_the_entry_and_field(tree, entry, message):
    with pytest.raises(ConfigError, match=message):
        load_data_config(_config(tree, entry))


def test_missing_and_empty_configs(tree):
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' does not exist"):
        load_data_config(tree / "missing.yaml")
    (tree / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="'datasets' is empty"):
        load_data_config(tree / "empty.yaml")


def test_strict_raises_and_lenient_warns_once(tree, caplog):
    cfg = load_data_config(_config(tree, {"json_path": "../ann/b.txt"}))
    with pytest.raises(DataError, match=r"b\.txt:2: start 2\.0 > end 1\.0"):
        load_samples(cfg, check_videos=False)
    with caplog.at_level(logging.WARNING):
        assert len(load_samples(cfg, check_videos=False, strict=False).samples) == 1
    assert [r.getMessage() for r in caplog.records] == ["skipped 1 of 2 samples: 1 start > end"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "examples" / "data").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_data_configs_are_valid_apart_from_the_data(path):
    cfg = from_dict(DataConfig, load_yaml(path), where=str(path))
    assert cfg.datasets
    for entry in cfg.datasets:
        parse_strategy(entry.sampling_strategy)
        assert entry.format in ("auto", *FORMATS)
