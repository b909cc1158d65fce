"""Data input faults: 1-frame videos, null text fields, UTF-8 BOMs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_tr1.data.annotations import load_annotations, sniff_format
from megatron_tr1.data.video import sample_frames
from megatron_tr1.data.video_writer import write_video
from megatron_tr1.errors import DataError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_data")
    write_video(root / "a.mp4", np.zeros((20, 32, 32, 3), np.uint8), fps=10.0)
    write_video(root / "one.mp4", np.zeros((1, 32, 32, 3), np.uint8), fps=10.0)
    return root


def _r1(**fields):
    return {"video": "a.mp4", "problem": "a person sits", "solution": [0.25, 0.5], "video_length": 2.0, **fields}


# ---------------------------------------------------------------- 1-frame video
def test_one_frame_video_error_names_the_file(folder):
    with pytest.raises(DataError, match=r"one\.mp4.*at least 2 frames.*has 1"):
        sample_frames(folder / "one.mp4", backend="pyav")


# ---------------------------------------------------------------- null / empty text fields
@pytest.mark.parametrize("field, value", [("problem", None), ("problem", "  "), ("problem", ["q"]),
                                          ("video", None), ("video", "")])
def test_null_text_field_is_a_data_error_naming_file_record_field(folder, tmp_path, field, value):
    path = tmp_path / "r1.json"
    path.write_text(json.dumps([_r1(), _r1(**{field: value})]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"r1\.json record 1: {field} must be a non-empty string, got "
                                        rf"{repr(value).replace('[', '.').replace(']', '.')}"):
        load_annotations(path, folder)
    ann = load_annotations(path, folder, strict=False)  # lenient: skipped and counted like other bad records
    assert [s.query for s in ann.samples] == ["a person sits"] and ann.skipped == {"bad value": 1}


def test_null_problem_never_becomes_the_query_none(folder, tmp_path):
    path = tmp_path / "r1.jsonl"
    path.write_text(json.dumps(_r1(problem=None)) + "\n" + json.dumps(_r1()) + "\n", encoding="utf-8")
    ann = load_annotations(path, folder, strict=False)
    assert "None" not in [s.query for s in ann.samples] and len(ann.samples) == 1


def test_activitynet_null_sentence_is_refused(folder, tmp_path):
    path = tmp_path / "anet.json"
    path.write_text(json.dumps({"a": {"duration": 2.0, "timestamps": [[0, 1], [0.5, 1.5]],
                                      "sentences": ["one", None]}}), encoding="utf-8")
    with pytest.raises(DataError, match=r"video 'a'.*sentences\[1\] must be a non-empty string, got None"):
        load_annotations(path, folder)


# ---------------------------------------------------------------- UTF-8 BOM
def test_json_with_a_bom_is_read_as_json(folder, tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([_r1()]).encode())
    ann = load_annotations(path, folder)
    assert [(s.query, s.start, s.end) for s in ann.samples] == [("a person sits", 0.5, 1.0)]
    assert sniff_format(path, "\ufeff[") == "temporal-r1" and sniff_format(path, "\ufeff {") == "activitynet"


def test_jsonl_and_charades_with_a_bom(folder, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_r1()) + "\n").encode())
    assert len(load_annotations(path, folder).samples) == 1
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"a 0.5 1.0##a person sits\n")
    assert load_annotations(path, folder).samples[0].id == "a#0"


def test_data_config_yaml_with_a_bom(folder, tmp_path):
    from megatron_tr1.data.dataset import load_data_config

    (tmp_path / "r1.json").write_text(json.dumps([_r1()]), encoding="utf-8")
    path = tmp_path / "data.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + f"datasets:\n  - json_path: r1.json\n    data_folder: {folder}\n".encode())
    assert load_data_config(path).datasets[0].data_folder == str(folder)
