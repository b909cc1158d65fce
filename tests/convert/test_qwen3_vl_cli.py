"""Qwen3-VL through the command line: ``tr1 convert hf-to-mcore`` at TP2, ``tr1 verify`` of those shards against the
HF folder (Megatron vs transformers logits on a text + video batch), and ``tr1 convert mcore-to-hf`` back to the
very tensors that were converted."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from megatron_tr1.cli import main as tr1


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_convert_verify_and_back_at_tp2(tmp_path, capsys):
    from megatron_tr1.demo import tiny_qwen3_vl_model, write_tiny_model_dir

    hf = tmp_path / "hf"
    write_tiny_model_dir(tiny_qwen3_vl_model(0, tie_word_embeddings=False), hf)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert tr1(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(mcore), "--tp", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert tr1(["verify", "--hf-dir", str(hf), "--mcore-dir", str(mcore)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("tp=2 pp=1 spec=local dtype=float32") and out[-2].endswith("OK"), out
    assert float(out[-1].split("=")[1]) < 1e-5
    assert tr1(["convert", "mcore-to-hf", "--mcore-dir", str(mcore), "--out", str(back), "--no-progress"]) == 0
    original, restored = _tensors(hf), _tensors(back)
    assert original.keys() == restored.keys() and any(k.startswith("model.visual.deepstack") for k in original)
    assert all(torch.equal(original[k], restored[k]) for k in original)
