"""``tr1 verify`` end to end: worker processes for TP x PP, Megatron vs HF logits on a text + video batch."""
from __future__ import annotations

import pytest

from megatron_tr1.cli import main as tr1
from megatron_tr1.convert.hf_to_mcore import convert_hf_to_mcore


def _verify(capsys, hf, mcore, *extra) -> tuple[int, float, str]:
    rc = tr1(["verify", "--hf-dir", str(hf), "--mcore-dir", str(mcore), *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("max_abs_logit_diff="), out
    return rc, float(out[-1].split("=")[1]), out[-2]


@pytest.fixture(scope="module")
def stored_tp2(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "mc"
    convert_hf_to_mcore(hf_dir(tied=False), out, tp=2, pp=1, progress=False)
    return out


def test_verify_at_tp2_matches_hf(hf_dir, stored_tp2, capsys):
    rc, diff, summary = _verify(capsys, hf_dir(tied=False), stored_tp2)
    assert rc == 0 and diff < 1e-5, summary
    assert summary.startswith("tp=2 pp=1 spec=local dtype=float32") and summary.endswith("OK")


def test_verify_at_pp2_reshards_the_tp2_checkpoint(hf_dir, stored_tp2, capsys):
    rc, diff, summary = _verify(capsys, hf_dir(tied=False), stored_tp2, "--tp", "1", "--pp", "2")
    assert rc == 0 and diff < 1e-5, summary
    assert summary.startswith("tp=1 pp=2")


def test_verify_fails_with_exit_1_on_other_weights(hf_dir, tmp_path, capsys):
    convert_hf_to_mcore(hf_dir(tied=True), tmp_path / "mc", tp=1, pp=1, progress=False)
    rc, diff, summary = _verify(capsys, hf_dir(tied=False), tmp_path / "mc")
    assert rc == 1 and diff > 1e-2 and summary.endswith("FAIL")


@pytest.mark.slow
def test_verify_at_tp2_pp2(hf_dir, stored_tp2, capsys):
    rc, diff, summary = _verify(capsys, hf_dir(tied=False), stored_tp2, "--tp", "2", "--pp", "2")
    assert rc == 0 and diff < 1e-5, summary
