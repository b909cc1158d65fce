"""The one weight loader (``convert.weights``): tensors match by their spelling-independent name, so a checkpoint in
transformer-engine spelling loads into a ``local`` model and back, a ``te`` model loads HF and ``local``
checkpoints, saves record the spelling written, and bad states name what is wrong."""
import pytest

from megatron_tr1.launch import run_ranks

from tests.convert import _weights_cases as cases


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    (result,) = run_ranks(cases.spelling_case, 1, str(tmp_path_factory.mktemp("weights")), timeout=300)
    return result


def test_either_spelling_loads_into_either_model(out):
    assert out["te_from_hf_folder"] == "hf" and out["te_from_hf_equal"]
    assert out["saved_spec"] == "te" and out["saved_te_names"] == 4 + 3  # 4 LM and 3 vision layers
    assert out["local_from_te_equal"] and out["te_from_local_equal"]
    assert out["saved_local_spec"] == "local"


def test_bad_states_name_the_tensors(out):
    e = out["errors"]
    assert "1 unexpected tensor(s): model.layers.0.mlp.bogus.weight" in e["extra"]
    assert "missing 1 tensor(s)" in e["missing"] and "visual.blocks.0.norm1" in e["missing"]
    assert "config mismatch: tensor model.norm.weight has shape (3,)" in e["shape"]
    assert "shapes differ" in e["model_shape"] and "final_layernorm" in e["model_shape"]
