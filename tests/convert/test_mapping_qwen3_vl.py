"""The HF <-> Megatron table for Qwen3-VL (dense): bit-exact round trips, its names equal to a saved model's, the
kinds it promises for the Qwen3-VL-only tensors, and Qwen2.5-VL's disk names left as they were."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megatron_tr1.convert import mapping
from megatron_tr1.demo import tiny_hf_model, tiny_qwen3_vl_config, tiny_qwen3_vl_model
from megatron_tr1.errors import CheckpointError
from megatron_tr1.testing.reference import mcore_to_hf_state

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def models():
    """tied -> the tiny HF Qwen3-VL model."""
    return {tied: tiny_qwen3_vl_model(seed=3 + tied, tie_word_embeddings=tied) for tied in (False, True)}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact_for_every_tensor(models, tp, pp, tied):
    state, config = models[tied].state_dict(), models[tied].config
    ranks = {(t, p): mapping.hf_to_mcore_state(state, config, t, tp, p, pp) for t in range(tp) for p in range(pp)}
    back = dict(mcore_to_hf_state(ranks, config, tp, pp))
    expected = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    has_output = [("language_model.output_layer.weight" in ranks[0, p]) for p in range(pp)]
    assert has_output == [p == pp - 1 and (not tied or pp > 1) for p in range(pp)]
    assert all(any(".deepstack_merger_list.1." in k for k in ranks[t, 0]) for t in range(tp))  # stage 0 only
    assert not any("vision." in k for t in range(tp) for p in range(1, pp) for k in ranks[t, p])


@pytest.mark.parametrize("tied", [False, True])
def test_table_names_equal_a_saved_models_safetensors_names(models, tied, tmp_path):
    models[tied].save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    required, optional = mapping.expected_hf_names(mapping.Dims.from_hf_config(models[tied].config))
    assert saved == required | (optional & saved)
    assert required == saved - ({"lm_head.weight"} if tied else set())
    assert all(mapping.hf_disk_name(n, "qwen3_vl") == n for n in saved)  # on disk as in memory


def test_hf_folder_loads_through_the_table(models, tmp_path):
    from megatron_tr1.convert.storage import SafetensorsDir

    models[False].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = mapping.hf_to_mcore_state(SafetensorsDir(tmp_path), config, 1, 2, 0, 2)
    ref = mapping.hf_to_mcore_state(models[False].state_dict(), models[False].config, 1, 2, 0, 2)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_qwen3_tensors_have_the_promised_kinds():
    d = mapping.Dims.from_hf_config(tiny_qwen3_vl_config())
    assert (d.family, d.head_dim, d.deepstack, d.v_pos_embed) == ("qwen3_vl", 32, 2, 64)
    stage = {p.mcore: p for p in mapping.params(d, 0, 1)}
    kinds = {
        "language_model.decoder.layers.0.self_attention.q_layernorm.weight": mapping.REPLICATED,
        "language_model.decoder.layers.0.self_attention.k_layernorm.weight": mapping.REPLICATED,
        "vision.decoder.layers.0.mlp.linear_fc1.weight": mapping.COLUMN,
        "vision.decoder.layers.0.mlp.linear_fc1.bias": mapping.COLUMN,
        "vision.decoder.layers.0.mlp.linear_fc2.weight": mapping.ROW,
        "vision.decoder.layers.0.mlp.linear_fc2.bias": mapping.REPLICATED,
        "vision.decoder.layers.0.input_layernorm.bias": mapping.REPLICATED,
        "vision.decoder.layers.0.pre_mlp_layernorm.bias": mapping.REPLICATED,
        "vision.patch_embed.proj.bias": mapping.REPLICATED,
        "vision.pos_embed.weight": mapping.REPLICATED,
        "vision.merger.norm.bias": mapping.REPLICATED,
        "vision.deepstack_merger_list.1.norm.weight": mapping.REPLICATED,
        "vision.deepstack_merger_list.1.linear_fc1.weight": mapping.COLUMN,
        "vision.deepstack_merger_list.1.linear_fc2.weight": mapping.ROW,
    }
    assert {name: stage[name].kind for name in kinds} == kinds
    assert stage["vision.deepstack_merger_list.1.norm.weight"].hf_shapes == ((d.merger_hidden,),)  # post-shuffle
    assert stage["vision.merger.norm.weight"].hf_shapes == ((d.v_hidden,),)
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.bias" not in stage  # no QKV bias
    assert stage["vision.decoder.layers.0.mlp.linear_fc1.weight"].hf == ("model.visual.blocks.0.mlp.linear_fc1.weight",)


def test_te_spelling_covers_the_layernorm_biases(models):
    state, config = models[False].state_dict(), models[False].config
    te = mapping.hf_to_mcore_state(state, config, 0, 1, 0, 1, spec="te")
    assert "vision.decoder.layers.0.self_attention.linear_qkv.layer_norm_bias" in te
    assert "vision.decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in te
    back = dict(mcore_to_hf_state({(0, 0): te}, config, 1, 1))
    assert torch.equal(back["model.visual.blocks.0.norm1.bias"], state["model.visual.blocks.0.norm1.bias"])


def test_missing_and_unexpected_tensors_are_named(models):
    state, config = models[False].state_dict(), models[False].config
    partial = {k: v for k, v in state.items() if "deepstack_merger_list.1.norm" not in k}
    with pytest.raises(CheckpointError, match=r"missing 2 tensor\(s\): model.visual.deepstack_merger_list.1.norm"):
        mapping.hf_to_mcore_state(partial, config, 0, 1, 0, 1)
    extra = {**state, "model.visual.deepstack_merger_list.2.norm.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): .*deepstack_merger_list.2.*Qwen3-VL"):
        mapping.hf_to_mcore_state(extra, config, 0, 1, 0, 1)


def test_qwen2_5_vl_disk_names_are_unchanged():
    assert mapping.hf_disk_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert mapping.hf_disk_name("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
    d = mapping.Dims.from_hf_config(tiny_hf_model(0).config)
    assert d.family == "qwen2_5_vl" and d.deepstack == 0
    assert "visual.merger.ln_q.weight" in mapping.expected_hf_names(d)[0]
