"""``tr1 eval --task mvbench --model DIR``: a tiny random model end to end through the HF rollout engine, each
protocol's prompt as the engine receives it."""
import json

import pytest

from megatron_tr1.cli import main
from megatron_tr1.data.prompt import SYSTEM_PROMPT_PLAIN, SYSTEM_PROMPT_THINK
from megatron_tr1.data.synthetic import generate
from megatron_tr1.data.synthetic_mc import write_mc_split
from megatron_tr1.data.videoqa import SYSTEM_PROMPT_MC_NO_THINK


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_tr1.demo import write_demo_model_dir
    from megatron_tr1.rl.config import TinyModelConfig

    root = tmp_path_factory.mktemp("mvbench_model")
    generate(root, num=1, num_test=2, num_ood=0, size=56, progress=False)
    config = write_mc_split(root, json.loads((root / "test.json").read_text()), "test", seed=0)
    hf = write_demo_model_dir(TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=1,
                                              vision_hidden_size=32, vision_heads=2), root / "hf")
    return config, hf


@pytest.mark.parametrize("protocol, extra, system, text", [
    ("custom", [], SYSTEM_PROMPT_PLAIN, "Question:Which happens in this video?\nOption:\n(A) "),
    ("r1", [], SYSTEM_PROMPT_THINK, "Only give the best option.\n"),
    ("answer", ["--no-think"], SYSTEM_PROMPT_MC_NO_THINK, "Which happens in this video?\n(A) "),
])
def test_model_end_to_end(setup, tmp_path, monkeypatch, protocol, extra, system, text):
    from megatron_tr1.rollout import hf_engine

    config, hf = setup
    seen = []
    generate_ = hf_engine.HFEngine.generate

    def spy(self, prompts, n, sampling):
        seen.extend(self.tokenizer.decode(p.input_ids) for p in prompts)
        return generate_(self, prompts, n, sampling)

    monkeypatch.setattr(hf_engine.HFEngine, "generate", spy)
    out = tmp_path / protocol
    assert main(["eval", "--task", "mvbench", "--data", str(config), "--model", str(hf), "--protocol", protocol,
                 "--max-tokens", "4", "--out", str(out), *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert metrics["overall"]["n"] == 4 and set(metrics) == {"overall", "which_event", "when_event"}
    assert run["system_prompt"] == system and run["protocol"] == protocol
    assert len(seen) == 4 and all(system in p for p in seen) and any(text in p for p in seen)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(r["raw"], str) for r in rows)


@pytest.mark.parametrize("whole_video", [False, True])
def test_records_with_start_end_see_only_their_clip(setup, tmp_path, monkeypatch, whole_video):
    """A record's ``start`` / ``end`` cut the frames the model sees (qwen-vl-utils' video_start / video_end);
    ``--whole-video`` samples the whole file as the seed's lmms-eval did."""
    import yaml

    from megatron_tr1.rollout import hf_engine

    config, hf = setup
    cfg = yaml.safe_load(config.read_text())
    first = cfg["datasets"][0]
    path = config.parent / first["json_path"]
    records = json.loads(path.read_text())[:1]
    records[0].update(start=1.0, end=2.0)
    clipped = tmp_path / "clipped.json"
    clipped.write_text(json.dumps(records))
    data = tmp_path / "clipped.yaml"
    data.write_text(yaml.safe_dump({"datasets": [{**first, "json_path": str(clipped),
                                                  "data_folder": str(config.parent / first["data_folder"])}]}))
    seen = []
    generate_ = hf_engine.HFEngine.generate
    monkeypatch.setattr(hf_engine.HFEngine, "generate",
                        lambda self, prompts, n, s: seen.extend(prompts) or generate_(self, prompts, n, s))
    out = tmp_path / "out"
    assert main(["eval", "--task", "mvbench", "--data", str(data), "--model", str(hf), "--protocol", "custom",
                 "--max-tokens", "2", "--out", str(out), *(["--whole-video"] if whole_video else [])]) == 0
    (prompt,) = seen
    times = prompt.frames.timestamps
    if whole_video:
        assert times.min() < 1.0 and times.max() > 2.0
    else:
        assert times.min() >= 1.0 and times.max() <= 2.0 and len(times) >= 2
    run = json.loads((out / "run.json").read_text())
    assert run["clips"] == ("whole video" if whole_video else "start/end")
