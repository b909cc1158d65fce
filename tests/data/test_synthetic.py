import json

import numpy as np
import pytest

from megatron_tr1.cli import main
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.data.synthetic import EVENTS, LOOKS, SPLITS, generate, render
from megatron_tr1.data.video import probe_video

from .conftest import decode_all


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num=8, seed=3, size=64, num_ood=3, num_pretrain=3, duration=(4, 12), workers=1, progress=False)
    return out


def test_layout_and_splits(data):
    for name in ("train", "test", "ood", "pretrain"):
        assert (data / f"{name}.json").is_file() and (data / f"{name}.yaml").is_file()
    meta = json.loads((data / "meta.json").read_text())
    assert meta["videos"] == {"train": 8, "test": 2, "ood": 3, "pretrain": 3} and meta["seed"] == 3
    assert "ood.json" in (data / "README.txt").read_text()
    kinds = {s: {r["event"] for r in json.loads((data / f"{s}.json").read_text())} for s in SPLITS}
    assert kinds["ood"].isdisjoint(set(SPLITS["train"][1]))  # out of domain: unseen event kinds
    assert kinds["train"] | kinds["test"] <= set(SPLITS["train"][1])
    # the base stage's grounding data: event kinds of neither the train/test nor the ood split
    assert kinds["pretrain"] <= set(SPLITS["pretrain"][1])
    assert set(SPLITS["pretrain"][1]).isdisjoint(set(SPLITS["train"][1]) | set(SPLITS["ood"][1]))


def test_splits_load_with_spans_inside_the_videos(data):
    for split in SPLITS:
        samples = load_samples(load_data_config(data / f"{split}.yaml")).samples
        assert len({s.video for s in samples}) == len(samples)
        for s in samples:
            info = probe_video(s.video)
            assert s.duration == pytest.approx(info.total_frames / info.video_fps)  # video_length = the container's
            assert 4 - 0.5 <= s.duration <= 12 + 0.5  # the fixture's duration range
            assert 0 <= s.start < s.end <= s.duration and s.end - s.start >= 0.1 * s.duration - 0.5
            assert any(s.query in phrasings for phrasings in EVENTS.values())


def test_same_seed_same_bytes_in_parallel_other_seed_other_data(data, tmp_path):
    generate(tmp_path / "again", num=8, seed=3, size=64, num_ood=3, num_pretrain=3, duration=(4, 12), workers=2,
             progress=False)
    for name in ("train.json", "test.json", "ood.json", "pretrain.json", "meta.json", "train.yaml"):
        assert (tmp_path / "again" / name).read_bytes() == (data / name).read_bytes(), name
    videos = sorted((data / "videos").iterdir())
    assert len(videos) == 16
    for path in videos:  # the same frames; x264 rounds a few pixels differently now and then (write_video)
        a, b = (decode_all(p)[0].astype(int) for p in (path, tmp_path / "again" / "videos" / path.name))
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 24, path.name
    generate(tmp_path / "other", num=8, seed=4, size=64, num_test=0, num_ood=0, progress=False)
    assert (tmp_path / "other" / "train.json").read_text() != (data / "train.json").read_text()
    assert not (tmp_path / "other" / "pretrain.json").exists()  # num_pretrain=0 (the default): no pretrain split
    other = json.loads((tmp_path / "other" / "train.json").read_text())
    assert {r["video_length"] for r in other} == {4.0}  # the default duration: every video 4 s
    assert len({r["video_length"] for r in json.loads((data / "train.json").read_text())}) > 1


@pytest.mark.parametrize("kind", sorted(EVENTS))
def test_the_event_shows_exactly_during_its_frames(kind):
    with_event = render(kind, 20, 64, 6, 14, np.random.default_rng(0))
    without = render(kind, 20, 64, 6, 6, np.random.default_rng(0))
    changed = np.abs(with_event.astype(int) - without).reshape(20, -1).max(axis=1) > 0
    assert changed.tolist() == [6 <= t < 14 for t in range(20)]


@pytest.mark.parametrize("kind", sorted(LOOKS))
def test_pretraining_kinds_draw_like_their_in_domain_kind_in_another_colour(kind):
    like, colour = LOOKS[kind]
    background = render(kind, 12, 64, 3, 3, np.random.default_rng(1))
    drawn = {k: render(k, 12, 64, 3, 9, np.random.default_rng(1)) for k in (kind, like)}
    masks = {k: np.any(v != background, axis=-1) for k, v in drawn.items()}
    assert masks[kind][3:9].any() and not masks[kind][:3].any() and np.array_equal(masks[kind], masks[like])
    if like != "green_screen":  # a tint blends with the frame; shapes are painted in the colour
        assert (drawn[kind][masks[kind]] == colour).all() and not (drawn[like][masks[like]] == colour).all()


def test_cli_with_vp9(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path), "--num", "1", "--num-test", "0", "--num-ood", "0",
                 "--size", "32", "--codec", "vp9"]) == 0
    assert json.loads((tmp_path / "train.json").read_text())[0]["video"] == "train_00000.webm"
    assert probe_video(tmp_path / "videos" / "train_00000.webm").codec == "vp9"
    assert "tr1 eval --data" in capsys.readouterr().out


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path), "--num", "2", "--size", "33"]) == 2
    assert "an even --size >= 32" in capsys.readouterr().err
    assert main(["make-synthetic", "--out", str(tmp_path), "--num", "2", "--duration", "8", "4"]) == 2
    assert "--duration needs 1 <= LOW <= HIGH seconds, got 8 4" in capsys.readouterr().err
