"""HF -> megatron config translation, layout validation errors, layer-spec selection, vision helpers."""
import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.config import language_config, validate_layout, vision_config
from megatron_tr1.models.qwen2_5_vl.specs import LayerSpecs, build_layer_specs
from megatron_tr1.models.qwen2_5_vl.vision import frame_cu_seqlens, window_index
from megatron_tr1.demo import tiny_hf_config


def test_language_and_vision_configs_follow_the_hf_config():
    hf = tiny_hf_config(num_key_value_heads=1)
    lm = language_config(hf, tp=1, pp=2)
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.kv_channels) == \
        (4, 128, 4, 1, 32)
    assert lm.pipeline_model_parallel_size == 2
    assert lm.mrope_section == [4, 6, 6] and lm.add_qkv_bias and not lm.add_bias_linear
    assert lm.gated_linear_unit and lm.normalization == "RMSNorm" and lm.layernorm_epsilon == 1e-6
    vis = vision_config(hf, tp=2)
    assert (vis.num_layers, vis.hidden_size, vis.num_query_groups, vis.ffn_hidden_size) == (3, 64, 4, 96)
    assert vis.add_bias_linear and vis.pipeline_model_parallel_size == 1


@pytest.mark.parametrize("overrides,tp,pp,field", [
    (dict(num_key_value_heads=1), 2, 1, "text_config.num_key_value_heads=1"),
    (dict(), 8, 1, "text_config.num_attention_heads=4"),
    (dict(vocab_size=511), 2, 1, "text_config.vocab_size=511"),
    (dict(), 1, 3, "text_config.num_hidden_layers=4"),
])
def test_layouts_that_cannot_shard_are_refused_by_name(overrides, tp, pp, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_layout(tiny_hf_config(**overrides), tp, pp)


def test_vision_heads_must_divide_by_tp():
    hf = tiny_hf_config()
    hf.vision_config.num_heads = 3
    with pytest.raises(ConfigError, match=r"vision_config\.num_heads=3"):
        validate_layout(hf, 2, 1)


def test_layer_spec_choice():
    local = build_layer_specs("local")
    assert local.backend == "local"
    with pytest.raises(ConfigError, match="model.layer_spec='flash'"):
        build_layer_specs("flash")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs transformer-engine"):
            build_layer_specs("te")


def test_local_masks():
    specs = build_layer_specs("local")
    mask = specs.language_attention(torch.tensor([[0, 1, 1]]))
    # row = query, column = key; True = masked: causal, and the left pad key is masked for everyone
    assert mask[0, 0].tolist() == [[True, True, True], [True, False, True], [True, False, False]]
    rows = specs.vision_attention(torch.tensor([0, 2, 3]))  # segments of 2 and 1 patches as batch rows
    assert rows.index.tolist() == [[0, 1], [2, 0]] and rows.valid.tolist() == [[True, True], [True, False]]
    assert rows.mask[:, 0, 0].tolist() == [[False, False], [False, True]]  # the padding key of row 2


@pytest.mark.parametrize("grid", [[[2, 8, 12]], [[1, 4, 4], [3, 12, 8]], [[1, 6, 10]]])
def test_window_index_equals_hf(grid):
    grid = torch.tensor(grid)
    order, cu = window_index(grid, merge=2, window=2)
    hf_order, hf_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
    assert torch.equal(order, hf_order) and torch.equal(cu.int(), hf_cu)
    assert frame_cu_seqlens(grid)[-1] == grid.prod(-1).sum()


def test_te_backend_takes_right_padding_only():
    local = build_layer_specs("local")
    te = LayerSpecs("te", local.language_layer, local.vision_layer)  # mask handling only; no TE needed
    assert te.language_attention(torch.tensor([[1, 1, 0]])) is None  # causal alone is exact here
    with pytest.raises(ConfigError, match="right-padded"):
        te.language_attention(torch.tensor([[0, 1, 1]]))
    packed = te.vision_attention(torch.tensor([0, 4, 6]))["packed_seq_params"]
    assert packed.qkv_format == "thd" and packed.max_seqlen_q == 4
