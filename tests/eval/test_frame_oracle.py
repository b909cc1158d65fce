"""The frame oracle: its span from the sampled frames, and its ceiling on synthetic data under two budgets."""
import json

import pytest
import torch
import yaml

from megatron_tr1.cli import main
from megatron_tr1.data.synthetic import generate
from megatron_tr1.eval.frame_oracle import oracle_span

TIMES = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64)  # 4 frames sampled from an 8 s video


@pytest.mark.parametrize("start, end, expected", [
    (1.5, 4.5, (1.0, 5.0)),  # frames 2 s and 4 s show it: from midpoint to midpoint
    (0.0, 0.5, (0.0, 1.0)),  # the first frame: from the video's start
    (5.5, 8.0, (5.0, 8.0)),  # the last frame: to the video's end
    (2.5, 3.5, (2.0, 4.0)),  # no sampled frame shows it: the gap between the frames around it
    (6.5, 7.5, (6.0, 8.0)),  # after the last frame
])
def test_oracle_span(start, end, expected):
    assert oracle_span(TIMES, start, end, 8.0) == pytest.approx(expected)


def test_frame_oracle_ceiling_rises_with_the_frame_budget_and_beats_fixed_spans(tmp_path):
    data = tmp_path / "data"
    generate(data, num=4, num_test=24, num_ood=0, seed=0, size=32, duration=(4, 16), progress=False)  # 8-32 frames
    scores = {}
    for frames in (4, 16):
        config = tmp_path / f"train{frames}.yaml"
        config.write_text(yaml.safe_dump({"data": {"video": {"max_frames": frames}}}))
        out = tmp_path / f"oracle{frames}"
        assert main(["eval", "--data", str(data / "test.yaml"), "--baseline", "frame-oracle",
                     "--train-config", str(config), "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["predictor"] == "frame-oracle" and metrics["video"]["max_frames"] == frames
        scores[frames] = metrics["metrics"]["all"]["mIoU"]
    assert main(["eval", "--data", str(data / "test.yaml"), "--baseline", "center", "--out", str(tmp_path / "c")]) == 0
    center = json.loads((tmp_path / "c" / "metrics.json").read_text())["metrics"]["all"]["mIoU"]
    assert center < scores[4] < scores[16] and scores[16] > 75
