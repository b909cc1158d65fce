import json

import numpy as np
import pytest

from megatron_tr1.data.annotations import Sample, load_annotations, sniff_format
from megatron_tr1.data.video_writer import write_video
from megatron_tr1.errors import DataError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Videos a.mp4, b.mp4 (2.0 s: 20 frames at 10 fps) and v_c.mp4 (1.0 s)."""
    root = tmp_path_factory.mktemp("annotations")
    frames = np.zeros((20, 32, 32, 3), np.uint8)
    write_video(root / "a.mp4", frames, fps=10.0)
    write_video(root / "b.mp4", frames, fps=10.0)
    write_video(root / "v_c.mp4", frames[:10], fps=10.0)
    return root


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _r1(video="a.mp4", solution=(0.25, 0.5), **extra):
    return {"video": video, "problem": "a person sits", "solution": list(solution), **extra}


def test_temporal_r1_fractions_become_seconds(folder, tmp_path):
    records = [
        _r1(video_length=8.0, dataset="charades"),
        _r1("b.mp4", (0.0, 1.0), problem='Give the query: "a "quoted" query", when does the described content occur '
            'in the video?.'),  # no video_length: the container's 20 frames / 10 fps
        _r1(video_length=8.0, id="q7"),
    ]
    ann = load_annotations(_write(tmp_path / "train.json", records), folder)
    a, b, c = ann.samples
    assert a == Sample(str(folder / "a.mp4"), "a person sits", 2.0, 4.0, 8.0, "charades", "a#0", "a person sits")
    assert (b.start, b.end, b.duration, b.query, b.dataset, b.id) == (0.0, 2.0, 2.0, 'a "quoted" query', "train", "b#0")
    assert b.problem == records[1]["problem"]  # verbatim: the training prompt's text
    assert c.id == "q7#0"
    assert (ann.total, ann.skipped, ann.summary()) == (3, {}, "")


def test_jsonl_and_its_line_numbers(folder, tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps(_r1(video_length=4)) + "\n\n" + json.dumps(_r1(video_length=4)) + "\n")
    assert [s.id for s in load_annotations(path, folder).samples] == ["a#0", "a#1"]
    _write(path, json.dumps(_r1()) + "\n{\"video\": \n")
    with pytest.raises(DataError, match=r"d\.jsonl:2:\d+: not valid JSON"):
        load_annotations(path, folder)


def test_charades_sta_text(folder, tmp_path):
    path = _write(tmp_path / "charades_sta_test.txt", "a 0.0 1.5##a person opens a door.\n\nb 0.5 2.3##someone laughs\n")
    first, second = load_annotations(path, folder).samples
    assert (first.video, first.start, first.end, first.query, first.id) == (str(folder / "a.mp4"), 0.0, 1.5,
                                                                           "a person opens a door.", "a#0")
    assert (second.end, second.duration) == (2.0, 2.0)  # 0.3 s past the end is within tolerance: clipped
    _write(path, "a 0.0 1.5##ok\nb 0.5 2.9##too long\n")
    with pytest.raises(DataError, match=r"charades_sta_test\.txt:2: \[0\.5, 2\.9\] s is beyond the video duration 2 s"):
        load_annotations(path, folder)
    _write(path, "a 0.0 1.5 a person\n")
    with pytest.raises(DataError, match=r":1: expected 'vid start end##sentence'"):
        load_annotations(path, folder)


def test_activitynet_finds_videos_with_or_without_the_v_prefix(folder, tmp_path):
    data = {"v_a": {"duration": 2.0, "timestamps": [[0, 1], [0.5, 2.0]], "sentences": ["x", " y "]},
            "c": {"duration": 1.0, "timestamps": [[0.2, 0.8]], "sentences": ["z"]}}
    samples = load_annotations(_write(tmp_path / "val_1.json", data), folder).samples
    assert [(s.video, s.query, s.id) for s in samples] == [
        (str(folder / "a.mp4"), "x", "v_a#0"), (str(folder / "a.mp4"), "y", "v_a#1"), (str(folder / "v_c.mp4"), "z", "c#0")]
    data["c"]["sentences"] = []
    with pytest.raises(DataError, match="video 'c': timestamps and sentences must be lists of the same length"):
        load_annotations(_write(tmp_path / "val_1.json", data), folder)


def test_sniffing(tmp_path):
    assert sniff_format(tmp_path / "x.json", " [") == "temporal-r1"
    assert sniff_format(tmp_path / "x.jsonl", '{"video"') == "temporal-r1"
    assert sniff_format(tmp_path / "x.json", "{") == "activitynet"
    assert sniff_format(tmp_path / "x.txt", "vid 1 2##q") == "charades-sta"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"is empty"),
        ("[]", r"has no records"),
        ("[\n  {\"video\": 1,,}\n]", r"bad\.json:2:\d+: not valid JSON"),
        ({"not": "a list of dicts"}, r"expected ActivityNet-Captions JSON"),
        ([_r1(), {"video": "a.mp4", "problem": "q"}], r"record 1: missing field 'solution'"),
        ([{"video": "a.mp4", "problem": "q", "solution": "0 to 1", "video_length": 2}], r"record 0: solution must be"),
        ([_r1(solution=(0.6, 0.2), video_length=8)], r"record 0: start 0\.6 > end 0\.2"),
        ([_r1(solution=(-0.1, 0.2), video_length=8)], r"record 0: negative time"),
        ([_r1(solution=(0.5, 1.4), video_length=8)], r"record 0: solution \[0\.5, 1\.4\] is past 1\.0"),
        ([_r1(solution=(0.5, 0.5), video_length=8)], r"record 0: empty span"),
        ([_r1(video_length=0)], r"video_length must be > 0"),
        ([_r1("gone.mp4", video_length=8)], r"record 0: video file '.*gone\.mp4' does not exist"),
    ],
)
def test_bad_input_names_file_record_and_value(folder, tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_annotations(_write(tmp_path / "bad.json", content), folder)


def test_missing_file_and_unknown_format(folder, tmp_path):
    with pytest.raises(DataError, match="annotation file '.*nope.json' does not exist"):
        load_annotations(tmp_path / "nope.json", folder)
    with pytest.raises(DataError, match="unknown annotation format 'csv'"):
        load_annotations(_write(tmp_path / "x.json", [_r1()]), folder, format="csv")


def test_binary_annotation_file(folder, tmp_path):
    with pytest.raises(DataError, match="a.mp4' is not UTF-8 text"):
        load_annotations(folder / "a.mp4", folder)


def test_undecodable_video(folder, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(DataError, match=r"record 0: .*junk\.mp4"):
        load_annotations(_write(tmp_path / "x.json", [_r1("junk.mp4")]), tmp_path)


def test_lenient_mode_skips_and_counts(folder, tmp_path):
    records = [_r1(video_length=8), _r1("gone.mp4", video_length=8), _r1("gone2.mp4", video_length=8),
               _r1(solution=(0.6, 0.2), video_length=8), _r1(video_length=8)]
    ann = load_annotations(_write(tmp_path / "x.json", records), folder, strict=False)
    assert [s.id for s in ann.samples] == ["a#0", "a#2"]  # ids do not shift when a record is skipped
    assert ann.summary() == "skipped 3 of 5 samples: 2 missing video, 1 start > end"


def test_videos_can_be_left_unchecked(tmp_path):
    ann = load_annotations(_write(tmp_path / "x.json", [_r1("gone.mp4", video_length=8)]), tmp_path, check_videos=False)
    assert ann.samples[0].video == str(tmp_path / "gone.mp4") and ann.samples[0].end == 4.0
    with pytest.raises(DataError, match="has no video_length and the video was not read"):
        load_annotations(_write(tmp_path / "x.json", [_r1("gone.mp4")]), tmp_path, check_videos=False)


def test_charades_train_length_comes_from_the_decoded_frames(folder, tmp_path):
    # the record says 8 s; the video has 20 frames at 10 fps: the seed's loader takes 2 s for charades_train
    path = _write(tmp_path / "c.json", [_r1(video_length=8.0, dataset="charades_train"), _r1(video_length=8.0)])
    frames, json_length = load_annotations(path, folder).samples
    assert (frames.start, frames.end, frames.duration) == (0.5, 1.0, 2.0)
    assert (json_length.start, json_length.end, json_length.duration) == (2.0, 4.0, 8.0)
    forced = load_annotations(path, folder, video_length="frames").samples
    assert [s.duration for s in forced] == [2.0, 2.0]
    never = load_annotations(path, folder, video_length="json").samples
    assert [s.duration for s in never] == [8.0, 8.0]


def test_problem_is_kept_verbatim_with_its_extra_sentence(folder, tmp_path):
    problem = 'Give the query: "a person sits", when does the described content occur in the video?. Answer in seconds.'
    (sample,) = load_annotations(_write(tmp_path / "p.json", [_r1(video_length=2, problem=problem)]), folder).samples
    assert sample.query == "a person sits" and sample.problem == problem


def test_verbatim_labels_keep_every_record_and_count_what_training_skips(folder, tmp_path):
    text = "a 0.0 1.5##fine.\na 1.8 1.2##start after end.\nb 0.5 9.0##ends past the video.\nb 1.0 1.0##empty.\n"
    path = _write(tmp_path / "charades_sta_test.txt", text)
    with pytest.raises(DataError, match="start 1.8 > end 1.2"):
        load_annotations(path, folder)
    assert len(load_annotations(path, folder, strict=False).samples) == 1
    ann = load_annotations(path, folder, labels="verbatim")
    assert [s.gt for s in ann.samples] == [(0.0, 1.5), (1.8, 1.2), (0.5, 9.0), (1.0, 1.0)]  # nothing clipped
    assert ann.notes == {"start > end": 1, "end past the duration": 1, "empty span": 1}
    assert ann.notes_summary().startswith("kept as written: ") and "1 start > end" in ann.notes_summary()
    # fractions are not clipped either
    r1 = load_annotations(_write(tmp_path / "f.json", [_r1(solution=(0.5, 1.2), video_length=2.0)]), folder,
                          labels="verbatim")
    assert r1.samples[0].gt == (1.0, pytest.approx(2.4)) and r1.notes == {"end past the duration": 1}


def test_lmms_tvg_layout(folder, tmp_path):
    records = [{"video": "a.mp4", "caption": "person sits.", "timestamp": [0.5, 1.5]},
               {"video": "v_c.mp4", "caption": "someone waves", "timestamp": [0.2, 3.0]}]
    path = _write(tmp_path / "activity_tvg.json", records)
    assert sniff_format(path, path.read_text()) == "lmms-tvg"
    first, second = load_annotations(path, folder, labels="verbatim").samples
    assert (first.video, first.query, first.gt, first.duration) == (str(folder / "a.mp4"), "person sits.",
                                                                    (0.5, 1.5), 2.0)
    assert (second.gt, second.dataset, second.problem) == ((0.2, 3.0), "activity_tvg", None)
    with pytest.raises(DataError, match=r"activity_tvg.json record 1: .*beyond the video duration"):
        load_annotations(path, folder)
    _write(path, [{"video": "a.mp4", "caption": "x"}])
    with pytest.raises(DataError, match="record 0: missing field 'timestamp'"):
        load_annotations(path, folder, format="lmms-tvg")
