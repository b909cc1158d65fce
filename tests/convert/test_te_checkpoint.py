"""A checkpoint in transformer-engine spelling (``tr1 convert hf-to-mcore --spec te``) does everything a ``local``
one does, on CPU: ``tr1 verify`` gives the same logits, ``tr1 convert mcore-to-hf`` the same tensors, ``tr1 eval
--model`` the same answers, and ``tr1 train model.hf_dir=<checkpoint>`` the same metrics."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_tr1.cli import main as tr1
from megatron_tr1.launch import run_ranks

from tests.rl import _trainer_cases

TINY = dict(hidden_size=64, intermediate_size=128, num_layers=1, vision_hidden_size=32, vision_heads=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from megatron_tr1.data import synthetic
    from megatron_tr1.demo import write_demo_model_dir
    from megatron_tr1.rl.config import TinyModelConfig

    root = tmp_path_factory.mktemp("te_ckpt")
    hf = write_demo_model_dir(TinyModelConfig(**TINY), root / "hf")
    for spec in ("local", "te"):
        assert tr1(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(root / spec), "--spec", spec,
                    "--no-progress"]) == 0
    synthetic.generate(root / "data", 8, num_test=4, num_ood=2, num_pretrain=0, size=56, progress=False)
    return root


def test_verify_gives_the_same_logits(ckpts, capsys):
    lines = {}
    for spec in ("local", "te"):
        assert tr1(["verify", "--hf-dir", str(ckpts / "hf"), "--mcore-dir", str(ckpts / spec)]) == 0
        lines[spec] = capsys.readouterr().out.strip().splitlines()[-1]
    assert lines["te"] == lines["local"] and lines["te"].startswith("max_abs_logit_diff=")


def test_converts_back_to_the_same_hf_tensors(ckpts):
    back = {}
    for spec in ("local", "te"):
        assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(ckpts / spec), "--out", str(ckpts / f"back_{spec}"),
                    "--no-progress"]) == 0
        back[spec] = load_file(str(ckpts / f"back_{spec}" / "model.safetensors"))
    assert back["te"].keys() == back["local"].keys()
    assert all(torch.equal(back["te"][k], v) for k, v in back["local"].items())


def test_evaluates_to_the_same_answers(ckpts, tmp_path, monkeypatch):
    """... and leaves no temporary export behind (``eval.model_predictor`` exports a checkpoint to HF first)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    answers = {}
    for spec in ("local", "te"):
        out = ckpts / f"eval_{spec}"
        assert tr1(["eval", "--data", str(ckpts / "data" / "test.yaml"), "--model", str(ckpts / spec),
                    "--max-tokens", "6", "--out", str(out)]) == 0
        answers[spec] = [json.loads(line)["raw"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert answers["te"] == answers["local"] and len(answers["te"]) == 4
    assert not list(tmp_path.iterdir())  # the exported HF folders are gone


def train_case(rank, world, root, ckpt):
    from megatron_tr1.rl.train_cli import train

    cfg = _trainer_cases.run_dir_config(root, f"model.hf_dir={ckpt}", "stages.base.enabled=false",
                                        "data.synthetic.num_pretrain=0",
                                        "stages.sft.steps=2", "stages.grpo.steps=1")
    return {"status": train(cfg), "metrics": _trainer_cases.metrics(root)}


def test_trains_to_the_same_metrics(ckpts):
    runs = {}
    for spec in ("local", "te"):
        shutil.copytree(ckpts / "data", ckpts / f"run_{spec}" / "data")  # one set of videos (H.264 is not repeatable)
        (runs[spec],) = run_ranks(train_case, 1, str(ckpts / f"run_{spec}"), str(ckpts / spec), timeout=600)
    assert runs["te"]["status"] == runs["local"]["status"] == "done"
    assert runs["te"]["metrics"] == runs["local"]["metrics"]
    assert json.loads(Path(ckpts / "run_te/stages/sft/model/tr1_mcore.json").read_text())["spec"] == "local"
