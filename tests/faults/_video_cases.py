"""Per-rank body of the undecodable-video training test (one gloo rank)."""
from pathlib import Path

from tests.rl import _trainer_cases


def corrupt_videos(data: Path, split: str, count: int) -> list[str]:
    """Overwrite the first ``count`` videos of ``split`` with bytes no decoder reads (the annotations keep their
    ``video_length``, so loading does not probe them: the first decode finds out)."""
    import json

    records = json.loads((data / f"{split}.json").read_text())
    bad = []
    for record in records[:count]:
        path = data / "videos" / record["video"]
        assert path.is_file(), path
        path.write_bytes(b"\x00garbage, not a video\x00" * 64)
        bad.append(str(path))
    return bad


def train_case(rank, world, root, *extra):
    from megatron_tr1.rl.train_cli import train

    cfg = _trainer_cases.run_dir_config(root, "stages.base.enabled=false", "stages.sft.steps=3",
                                        "stages.grpo.steps=1", *extra)
    return {"status": train(cfg), "metrics": _trainer_cases.metrics(root)}
