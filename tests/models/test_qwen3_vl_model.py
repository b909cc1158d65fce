"""The megatron-core Qwen3-VL (dense) equals HF transformers' ``Qwen3VLForConditionalGeneration`` on the same weights.

fp32 on CPU, positions from HF's own ``get_rope_index`` for both. Tolerances as Qwen2.5-VL's
(``test_model_parallel``): logits, log-probs and entropies 1e-5 absolute (logit scale ~1; measured <= 2e-6); every
parameter gradient, mapped back to its HF name through ``convert.mapping``, within 2e-5 of the HF gradient relative to
that gradient's largest entry (measured <= 1.2e-6). At TP2 the QK-norm gradients are summed over TP first, as
megatron's ``finalize_model_grads`` does. Layouts: TP1 untied / tied + full recompute, TP2 tied, PP2 tied + full
recompute (DeepStack's LM layers 0, 1 on stage 0); TP2 and PP2 untied are ``slow``. The parts (interleaved M-RoPE,
learned-position resampling, vision rotary) are also checked against HF's own modules without ranks.
"""
import pytest
import torch

from megatron_tr1.demo import tiny_qwen3_vl_config, tiny_qwen3_vl_model
from megatron_tr1.errors import ConfigError
from megatron_tr1.launch import run_ranks

import _qwen3_vl_cases as cases

LOGIT_ATOL = 1e-5
GRAD_RTOL = 2e-5
N_TENSORS = 104  # every HF tensor of the tiny untied model (tied: no lm_head)


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(cases.one_rank_suite, 1)


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(cases.two_rank_suite, 2)


def _check_grads(results, key, hf_key, tp, pp, tie, **config_kwargs):
    rank_grads = {k: v for r in results for k, v in r[key].items()}
    config = tiny_qwen3_vl_config(tie_word_embeddings=tie, **config_kwargs)
    errors = cases.compare_grads(rank_grads, config, tp, pp, results[0][hf_key])
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, f"{worst}: relative grad error {errors[worst]:.2e}"
    assert len(errors) == N_TENSORS - tie  # vision tower, DeepStack mergers, position embedding included


def _check_tp(results, tp, tie, kv):
    for r in results:
        for name in ("text", "video", "video+image"):
            assert r[f"logits_diff_{name}"] < LOGIT_ATOL, name
        assert r["logprob_diff"] < LOGIT_ATOL
        assert r["entropy_diff"] < LOGIT_ATOL
    _check_grads(results, "ce_grads", "hf_ce_grads", tp, 1, tie, num_key_value_heads=kv)
    _check_grads(results, "rl_grads", "hf_rl_grads", tp, 1, tie, num_key_value_heads=kv)


def _check_pipeline(results, tp, tie):
    last = [r for r in results if not r["first"]]
    assert len(last) == tp
    for r in last:
        assert r["logits_diff"] < LOGIT_ATOL
        assert abs(r["loss"] - r["hf_loss"]) < 1e-5
    _check_grads(results, "grads", "hf_grads", tp, 2, tie)


def test_tp1_untied_logits_grads_and_rl_logprobs_equal_hf(one_rank):
    _check_tp([r["tp1"] for r in one_rank], 1, False, 2)


def test_tp1_tied_single_query_group_with_full_recompute_equals_hf(one_rank):
    _check_tp([r["tp1_tied_recompute"] for r in one_rank], 1, True, 1)


def test_freeze_switches_cover_the_position_table_and_deepstack_mergers(one_rank):
    parts = {"vision_tower": ("vision.patch_embed.", "vision.pos_embed.", "vision.decoder."),
             "merger": ("vision.merger.", "vision.deepstack_merger_list."), "language_model": ("language_model.",)}
    for switch, state in one_rank[0]["freeze"].items():
        assert any(state.values()) and not all(state.values())
        for name, requires_grad in state.items():
            assert requires_grad is not name.startswith(parts[switch]), (switch, name)
    assert any(n.startswith("vision.deepstack_merger_list.") for n in one_rank[0]["freeze"]["merger"])


def test_packed_logprobs_equal_the_padded_ones(one_rank):
    r = one_rank[0]["packed"]
    assert r["tokens"] > 50
    assert r["logprob_diff"] < 1e-5 and r["entropy_diff"] < 1e-5 and r["grad_rel"] < 1e-5, r


def test_tp2_tied_logits_grads_and_rl_logprobs_equal_hf(two_ranks):
    _check_tp([r["tp2_tied"] for r in two_ranks], 2, True, 2)


def test_pp2_tied_with_deepstack_on_stage_0_and_full_recompute_equals_hf(two_ranks):
    _check_pipeline([r["pp2_tied_recompute"] for r in two_ranks], 1, True)


@pytest.mark.slow
def test_tp2_and_pp2_untied_equal_hf():
    """2 ranks, ~30 s: ``pytest -m slow tests/models/test_qwen3_vl_model.py``."""
    results = run_ranks(cases.two_rank_untied_suite, 2)
    _check_tp([r["tp2"] for r in results], 2, False, 2)
    _check_pipeline([r["pp2"] for r in results], 1, False)


# --- without ranks ---

def test_a_pipeline_layout_without_the_deepstack_layers_on_stage_0_is_refused():
    from megatron_tr1.convert.mapping import Dims
    from megatron_tr1.models.qwen3_vl.config import language_config

    with pytest.raises(ConfigError, match=r"^model\.pipeline_parallel=4 puts LM layers 0-0 on pipeline stage 0, but "
                                          r"DeepStack adds vision features after LM layers 0-1 .*has 2 entries"):
        language_config(tiny_qwen3_vl_config(), tp=1, pp=4)
    three = tiny_qwen3_vl_config()
    three.vision_config.deepstack_visual_indexes = [0, 1, 2]
    with pytest.raises(ConfigError, match=r"^--pp 2 puts LM layers 0-1 on pipeline stage 0, but DeepStack adds "
                                          r"vision features after LM layers 0-2"):
        Dims.from_hf_config(three).validate(1, 2)
    language_config(tiny_qwen3_vl_config(), tp=2, pp=2)  # layers 0, 1 on stage 0: accepted


def test_unsupported_qwen3_fields_are_refused_naming_them():
    from megatron_tr1.models.qwen3_vl.config import validate_layout

    with pytest.raises(ConfigError, match="attention_bias=true is not supported"):
        validate_layout(tiny_qwen3_vl_config(attention_bias=True), 1, 1)
    bad = tiny_qwen3_vl_config()
    bad.text_config.rope_parameters["mrope_section"] = [4, 4, 4]
    with pytest.raises(ConfigError, match=r"mrope_section=\[4, 4, 4\] must be 3 numbers summing to head_dim/2=16"):
        validate_layout(bad, 1, 1)


def test_interleaved_mrope_angles_equal_hf_rotary():
    from megatron_tr1.models.qwen3_vl.language import InterleavedMRoPE

    hf = tiny_qwen3_vl_model(0)
    text = hf.config.text_config
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 300, (3, 2, 17), generator=g)
    cos, sin = hf.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # [b, s, head_dim]
    angles = InterleavedMRoPE(32, text.rope_parameters["rope_theta"], text.rope_parameters["mrope_section"])(pos)
    assert angles.shape == (17, 2, 1, 32)
    ours = angles[:, :, 0].transpose(0, 1)
    assert torch.allclose(ours.cos(), cos, atol=1e-6) and torch.allclose(ours.sin(), sin, atol=1e-6)


def test_learned_positions_equal_hf_and_bilinear_interpolation():
    import torch.nn.functional as F
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from megatron_tr1.models.qwen3_vl.vision import interpolation_taps

    grid = torch.tensor([[2, 8, 12], [1, 4, 4], [1, 12, 6]])
    table = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    index, weight = interpolation_taps(grid, 2, 8)
    ours = (table[index] * weight[..., None]).sum(1)
    hf_index, hf_weight = get_vision_interpolation_indices_and_weights(grid, 8, "bilinear", True, 2)
    assert torch.allclose(ours, (table[hf_index] * hf_weight[..., None]).sum(1), atol=1e-6)
    t, h, w = grid[0].tolist()  # the first frame against F.interpolate, put in merge-unit order
    image = F.interpolate(table.T.reshape(1, 5, 8, 8), size=(h, w), mode="bilinear", align_corners=True)[0]
    units = image.reshape(5, h // 2, 2, w // 2, 2).permute(1, 3, 2, 4, 0).reshape(h * w, 5)
    assert torch.allclose(ours[:h * w], units, atol=1e-5) and torch.equal(ours[:h * w], ours[h * w:2 * h * w])


def test_vision_rotary_equals_hf():
    from transformers.vision_utils import get_vision_position_ids

    from megatron_tr1.models.qwen2_5_vl.vision import rotary_freqs

    hf = tiny_qwen3_vl_model(0)
    grid = torch.tensor([[2, 8, 12], [1, 4, 4]])
    cos, _ = hf.model.visual.rotary_pos_emb(torch.zeros(1), get_vision_position_ids(grid, 2))
    ours = rotary_freqs(grid, 2, 16, hf.config.vision_config.rope_parameters["rope_theta"])
    assert torch.allclose(ours.cos(), cos, atol=1e-6)
