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
