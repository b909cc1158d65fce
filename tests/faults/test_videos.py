"""An undecodable video never ends a run: training skips the sample wherever it is first decoded (the next prompt
takes its place), warns once per video, counts it in the metrics (``data/skipped_samples``) and at the end;
evaluation inside the run leaves it out; ``tr1 eval --lenient`` skips and counts it, strict ``tr1 eval`` names it."""
import json

from megatron_tr1.cli import main as tr1

from megatron_tr1.launch import run_ranks

from tests.faults import _video_cases as cases


def test_training_skips_undecodable_videos(tmp_path):
    from megatron_tr1.data import synthetic

    data = tmp_path / "run" / "data"
    synthetic.generate(data, 8, num_test=4, num_ood=2, num_pretrain=4, size=56, progress=False)
    bad = cases.corrupt_videos(data, "train", 2)
    bad += cases.corrupt_videos(data, "test", 1)
    (out,) = run_ranks(cases.train_case, 1, str(tmp_path / "run"), timeout=600)
    assert out["status"] == "done"
    sft, grpo = out["metrics"]["sft"], out["metrics"]["grpo"]
    assert len(sft) == 3 and len(grpo) == 1
    assert all(r["skipped"] == 0 for r in sft)  # full batches: the skipped samples were replaced
    # 8 samples per SFT step: 3 steps go through the 8 train videos 3 times; each pass meets the 2 bad ones
    assert sft[-1]["data/skipped_samples"] >= 4 and grpo[-1]["data/skipped_samples"] >= sft[-1]["data/skipped_samples"]
    assert out["metrics"]["results"]["sft"]["n"] == 3  # 4 test videos, one undecodable
    assert out["metrics"]["results"]["ood"]["sft"]["n"] == 2


def test_eval_lenient_skips_and_strict_names_the_video(tmp_path, capsys):
    from megatron_tr1.data import synthetic

    data = tmp_path / "data"
    synthetic.generate(data, 2, num_test=3, num_ood=0, num_pretrain=0, size=56, progress=False)
    (bad,) = cases.corrupt_videos(data, "test", 1)
    hf = tmp_path / "hf"
    from megatron_tr1.demo import write_demo_model_dir
    from megatron_tr1.rl.config import TinyModelConfig
    write_demo_model_dir(TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=1,
                                         vision_hidden_size=32, vision_heads=2), hf)
    run = ["eval", "--data", str(data / "test.yaml"), "--model", str(hf), "--max-tokens", "4"]
    assert tr1(run) == 2
    assert bad in capsys.readouterr().err  # strict: the file is named
    assert tr1(run + ["--lenient", "--out", str(tmp_path / "out")]) == 0
    assert "skipped 1 of 3 samples: undecodable video" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["skipped_undecodable"] == 1 and metrics["metrics"]["all"]["n"] == 2
