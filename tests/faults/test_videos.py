"""An undecodable video never ends a run: training skips the sample wherever it is first decoded (the next prompt
takes its place), warns once per video, counts it in the metrics (``data/skipped_samples``) and at the end."""

from megatron_tr1.launch import run_ranks

from tests.faults import _video_cases as cases


def test_training_skips_undecodable_videos(tmp_path):
    from megatron_tr1.data import synthetic

    data = tmp_path / "run" / "data"
    synthetic.generate(data, 8, num_test=4, num_ood=2, num_pretrain=4, size=56, progress=False)
    bad = cases.corrupt_videos(data, "train", 2)
    (out,) = run_ranks(cases.train_case, 1, str(tmp_path / "run"), timeout=600)
    assert out["status"] == "done"
    sft, grpo = out["metrics"]["sft"], out["metrics"]["grpo"]
    assert len(sft) == 3 and len(grpo) == 1
    assert all(r["skipped"] == 0 for r in sft)  # full batches: the skipped samples were replaced
    # 8 samples per SFT step: 3 steps go through the 8 train videos 3 times; each pass meets the 2 bad ones
    assert sft[-1]["data/skipped_samples"] >= 4 and grpo[-1]["data/skipped_samples"] >= sft[-1]["data/skipped_samples"]
    assert out["metrics"]["results"]["sft"]["n"] == 4  # evaluation unaffected (test videos are fine)
    assert bad
