"""The trainer's final evaluation under the seed's protocols, and the results table in the seed's shape."""
import json

import pytest

from megatron_tr1.data import synthetic
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.data.prompt_cache import PromptCache
from megatron_tr1.data.video import VideoBudget
from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_config
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.stage_eval import StageEvaluator
from megatron_tr1.rl.train_cli import collect_results, print_results

R1 = '<think>t</think><answer>{{"start_time": "{s}", "end_time": "{e}"}}</answer>'


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 8, seed=0, size=32, progress=False)
    return {s: load_samples(load_data_config(f"{out}/{s}.yaml")).samples for s in ("test", "ood")}


class Engine:
    """Answers each prompt's ground truth as R1 JSON when the system prompt asks for think, as "s - e" text under the
    plain system prompt; records the prompts' system prompts."""

    def __init__(self, tok, truth):
        self.tok, self.truth, self.systems = tok, truth, []

    def generate(self, prompts, n, sampling):
        out = []
        for p in prompts:
            text = self.tok.decode(p.input_ids)
            system = "plain" if "You are a helpful assistant." in text else "think"
            self.systems.append(system)
            s, e = self.truth[p.key[:2]]
            answer = R1.format(s=s, e=e) if system == "think" else f"{s} - {e + 1.0}"
            out.append([type("R", (), {"text": answer})()])
        return out


@pytest.mark.parametrize("stage, protocols", [("grpo", ["custom", "r1"]), ("grpo_no_think", [])])
def test_final_evaluation_adds_the_seeds_protocols(samples, tmp_path, stage, protocols):
    cfg = TrainConfig()
    cfg.logging.progress = False
    cfg.data.video = VideoBudget(max_frames=4)
    tok = build_tiny_tokenizer()
    truth = {(s.video, s.query): (s.start, s.end) for split in samples.values() for s in split}
    engine = Engine(tok, truth)
    evaluator = StageEvaluator(cfg, engine, samples, PromptCache(tok, tiny_hf_config(), cfg.data.video))
    results = evaluator.final(stage, stage != "grpo_no_think", tmp_path, write=True)
    assert set(results) == {"test", "ood"} | ({"protocols"} if protocols else set())
    assert list(results.get("protocols", {})) == protocols
    if "r1" in protocols:
        assert results["protocols"]["r1"]["test"]["mIoU"] == pytest.approx(100.0)
        stored = json.loads((tmp_path / "test-r1" / "submission.json").read_text())
        assert all("-" in v and "<think>" not in v for v in stored.values())
    if "custom" in protocols:
        custom = results["protocols"]["custom"]["ood"]
        assert 0 < custom["mIoU"] < 100 and custom["n"] == len(samples["ood"])
        assert "plain" in engine.systems
    cfg.eval.seed_protocols = False
    assert "protocols" not in StageEvaluator(cfg, engine, samples, evaluator.cache).final(stage, True, tmp_path / "x",
                                                                                        write=False)


def test_results_keep_their_keys_and_the_table_has_the_seeds_rows(tmp_path, capsys):
    m = {"n": 2, "mIoU": 40.0, "R@0.3": 50.0, "R@0.5": 50.0, "R@0.7": 0.0}
    for stage, protocols in (("base", ["custom"]), ("sft", ["custom"]), ("grpo", ["custom", "r1"]),
                             ("grpo_no_think", [])):
        folder = tmp_path / "stages" / stage
        folder.mkdir(parents=True)
        result = {"test": m, "ood": m}
        if protocols:
            result["protocols"] = {p: {"test": m, "ood": m} for p in protocols}
        (folder / "results.json").write_text(json.dumps(result))
    results = collect_results(tmp_path)
    assert results["grpo"] == m and results["ood"]["sft"] == m
    assert set(results["protocols"]) == {"base", "sft", "grpo"} and set(results["protocols"]["grpo"]) == {"custom", "r1"}
    print_results(results)
    printed = capsys.readouterr().out
    for row in ("base (custom)", "SFT (custom)", "think ✗ (custom)", "think ✓ (r1)", "grpo_no_think (ours"):
        assert row in printed
