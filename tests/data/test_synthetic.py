import json

import numpy as np
import pytest

from megatron_tr1.cli import main
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.data.synthetic import EVENTS, SPLITS, generate, render
from megatron_tr1.data.video import probe_video


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num=8, seed=3, size=64, num_ood=3, progress=False)
    return out


def test_layout_and_splits(data):
    for name in ("train", "test", "ood"):
        assert (data / f"{name}.json").is_file() and (data / f"{name}.yaml").is_file()
    meta = json.loads((data / "meta.json").read_text())
    assert meta["videos"] == {"train": 8, "test": 2, "ood": 3} and meta["seed"] == 3
    assert "ood.json" in (data / "README.txt").read_text()
    kinds = {s: {r["event"] for r in json.loads((data / f"{s}.json").read_text())} for s in SPLITS}
    assert kinds["ood"].isdisjoint(set(SPLITS["train"][1]))  # out of domain: unseen event kinds
    assert kinds["train"] | kinds["test"] <= set(SPLITS["train"][1])


def test_splits_load_with_spans_inside_the_videos(data):
    for split, (_, _, (low, high)) in SPLITS.items():
        samples = load_samples(load_data_config(data / f"{split}.yaml")).samples
        assert len({s.video for s in samples}) == len(samples)
        for s in samples:
            info = probe_video(s.video)
            assert s.duration == pytest.approx(info.total_frames / info.video_fps)  # video_length = the container's
            assert low - 0.5 <= s.duration <= high + 0.5
            assert 0 <= s.start < s.end <= s.duration and s.end - s.start >= 0.1 * s.duration - 0.5
            assert any(s.query in phrasings for phrasings in EVENTS.values())


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    generate(tmp_path / "again", num=8, seed=3, size=64, num_ood=3, progress=False)
    for name in ("train.json", "test.json", "ood.json", "meta.json", "train.yaml", "videos/train_00005.mp4"):
        assert (tmp_path / "again" / name).read_bytes() == (data / name).read_bytes(), name
    generate(tmp_path / "other", num=8, seed=4, size=64, num_test=0, num_ood=0, progress=False)
    assert (tmp_path / "other" / "train.json").read_text() != (data / "train.json").read_text()


@pytest.mark.parametrize("kind", sorted(EVENTS))
def test_the_event_shows_exactly_during_its_frames(kind):
    with_event = render(kind, 20, 64, 6, 14, np.random.default_rng(0))
    without = render(kind, 20, 64, 6, 6, np.random.default_rng(0))
    changed = np.abs(with_event.astype(int) - without).reshape(20, -1).max(axis=1) > 0
    assert changed.tolist() == [6 <= t < 14 for t in range(20)]


def test_cli_with_vp9(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path), "--num", "1", "--num-test", "0", "--num-ood", "0",
                 "--size", "32", "--codec", "vp9"]) == 0
    assert json.loads((tmp_path / "train.json").read_text())[0]["video"] == "train_00000.webm"
    assert probe_video(tmp_path / "videos" / "train_00000.webm").codec == "vp9"
    assert "tr1 eval --data" in capsys.readouterr().out


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path), "--num", "2", "--size", "33"]) == 2
    assert "an even --size >= 32" in capsys.readouterr().err
