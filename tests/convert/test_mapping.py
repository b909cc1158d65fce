"""The HF <-> Megatron table: bit-exact round trips, the fused layouts it promises, and its input checks."""
from __future__ import annotations

import pytest
import torch

from megatron_tr1.convert import mapping
from megatron_tr1.testing.reference import mcore_to_hf_state
from megatron_tr1.errors import CheckpointError, ConfigError
from megatron_tr1.demo import tiny_hf_config, tiny_hf_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def models():
    """(tied, groups) -> (in-memory HF state dict, config)."""
    out = {}
    for tied in (False, True):
        for groups in (1, 2):
            m = tiny_hf_model(seed=groups + 10 * tied, tie_word_embeddings=tied, num_key_value_heads=groups)
            out[tied, groups] = (m.state_dict(), m.config)
    return out


# megatron-core needs TP | query groups, so one group runs at TP1 only (TP2 with one group is refused below).
@pytest.mark.parametrize("groups,tp,pp", [(2, tp, pp) for tp, pp in LAYOUTS] + [(1, 1, 1), (1, 1, 2)])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact_for_every_tensor(models, tp, pp, tied, groups):
    state, config = models[tied, groups]
    ranks = {(t, p): mapping.hf_to_mcore_state(state, config, t, tp, p, pp) for t in range(tp) for p in range(pp)}
    back = dict(mcore_to_hf_state(ranks, config, tp, pp))
    disk = {mapping.hf_disk_name(k): v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert back.keys() == disk.keys()
    for name, tensor in disk.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    has_output = [("language_model.output_layer.weight" in ranks[0, p]) for p in range(pp)]
    assert has_output == [p == pp - 1 and (not tied or pp > 1) for p in range(pp)]


def _numbered(rows: int, cols: int, base: float) -> torch.Tensor:
    """Row r holds base + r everywhere: the row a value came from is readable after any permutation."""
    return (base + torch.arange(rows, dtype=torch.float32))[:, None].expand(rows, cols).clone()


def test_qkv_shards_interleave_query_groups_and_split_them_contiguously():
    d = mapping.Dims.from_hf_config(tiny_hf_config(num_key_value_heads=2))  # 4 heads, 2 groups, head_dim 32
    stage = {p.mcore: p for p in mapping.params(d, 0, 1)}
    p = stage["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    hd, h = d.head_dim, d.hidden
    q, k, v = _numbered(4 * hd, h, 0), _numbered(2 * hd, h, 1000), _numbered(2 * hd, h, 2000)
    shard1 = mapping.split(p, [q, k, v], tp_rank=1, tp_size=2)  # group 1: q heads 2,3, k head 1, v head 1
    expected = torch.cat([q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])
    assert torch.equal(shard1, expected)


def test_vision_qkv_has_one_group_per_head_and_fc1_is_gate_then_up():
    d = mapping.Dims.from_hf_config(tiny_hf_config())  # vision hidden 64, 4 heads of 16
    stage = {p.mcore: p for p in mapping.params(d, 0, 1)}
    qkv = stage["vision.decoder.layers.0.self_attention.linear_qkv.bias"]
    fused = torch.arange(3 * 64, dtype=torch.float32)  # HF: [q all heads | k all | v all]
    shard = mapping.split(qkv, [fused], tp_rank=0, tp_size=2)  # heads 0, 1
    q, k, v = fused.split(64)
    assert torch.equal(shard, torch.cat([q[:16], k[:16], v[:16], q[16:32], k[16:32], v[16:32]]))
    fc1 = stage["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = _numbered(d.ffn, d.hidden, 0), _numbered(d.ffn, d.hidden, 10000)
    half = d.ffn // 2
    assert torch.equal(mapping.split(fc1, [gate, up], 1, 2), torch.cat([gate[half:], up[half:]]))


def test_row_parallel_biases_are_replicated_and_weights_split_on_dim_1():
    d = mapping.Dims.from_hf_config(tiny_hf_config())
    stage = {p.mcore: p for p in mapping.params(d, 0, 1)}
    assert stage["vision.merger.linear_fc2.bias"].kind == mapping.REPLICATED
    assert stage["vision.decoder.layers.0.self_attention.linear_proj.bias"].kind == mapping.REPLICATED
    w = torch.randn(d.hidden, d.hidden)
    proj = stage["language_model.decoder.layers.0.self_attention.linear_proj.weight"]
    assert torch.equal(mapping.split(proj, [w], 1, 2), w[:, d.hidden // 2:])


def test_te_spelling_is_written_on_request_and_read_back(models):
    state, config = models[False, 2]
    te = mapping.hf_to_mcore_state(state, config, 0, 1, 0, 1, spec="te")
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "vision.decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in te)
    te["language_model.decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.empty(0)
    back = dict(mcore_to_hf_state({(0, 0): te}, config, 1, 1))
    assert torch.equal(back["model.layers.0.input_layernorm.weight"],
                       state["model.language_model.layers.0.input_layernorm.weight"])


@pytest.mark.parametrize("cfg,tp,pp,field", [
    (dict(), 3, 1, "num_attention_heads=4"),
    (dict(num_key_value_heads=1), 2, 1, "num_key_value_heads=1"),
    (dict(vocab_size=511), 2, 1, "vocab_size=511"),
    (dict(), 1, 3, "num_hidden_layers=4"),
])
def test_sizes_that_do_not_divide_are_refused_naming_the_field(cfg, tp, pp, field):
    d = mapping.Dims.from_hf_config(tiny_hf_config(**cfg))
    with pytest.raises(ConfigError, match=f"{field} .*choose a {'TP' if pp == 1 else 'PP'}"):
        d.validate(tp, pp)


def test_missing_and_unexpected_tensors_are_listed_by_name(models):
    state, config = models[False, 2]
    partial = {k: v for k, v in state.items() if "layers.3.mlp" not in k}
    with pytest.raises(CheckpointError, match=r"missing 3 tensor\(s\): model.layers.3.mlp.down_proj.weight, "
                                              r"model.layers.3.mlp.gate_proj.weight, model.layers.3.mlp.up_proj"):
        mapping.hf_to_mcore_state(partial, config, 0, 1, 0, 1)
    extra = {**state, "model.layers.9.self_attn.q_proj.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): model.layers.9.self_attn.q_proj.weight"):
        mapping.hf_to_mcore_state(extra, config, 0, 1, 0, 1)
    # only the requested stage must be present: stage 1 of PP2 needs no vision tensors
    no_vision = {k: v for k, v in state.items() if ".visual." not in k}
    assert "language_model.decoder.final_layernorm.weight" in mapping.hf_to_mcore_state(no_vision, config, 0, 1, 1, 2)


def test_a_config_that_does_not_match_the_weights_is_refused(models):
    state, _ = models[False, 2]
    wrong = tiny_hf_config(intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"config mismatch: tensor model.layers.0.mlp.gate_proj.weight has "
                                              r"shape \(256, 128\) .*implies \(128, 128\)"):
        mapping.hf_to_mcore_state(state, wrong, 0, 1, 0, 1)
