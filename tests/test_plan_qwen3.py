"""The planner's Qwen3-VL (dense) family: parameter counts against ``Qwen3VLForConditionalGeneration`` (tiny configs
built for real, the 2B / 4B / 8B built-ins on the meta device), a spec counted by hand, the per-layer activation
shapes (query width apart from hidden, QK-norm, GELU vision MLP), the DeepStack pipeline rule, config.json reading
and its errors, and the ``tr1 plan`` output."""
import json

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from megatron_tr1.cli import main as tr1
from megatron_tr1.errors import ConfigError
from megatron_tr1.plan.layouts import Layout, enumerate_layouts, excluded_pp, model_blockers, text_blockers
from megatron_tr1.plan.memory import Workload, stage_breakdowns
from megatron_tr1.plan.models import BUILTIN, ModelSpec, TextSpec, VisionSpec, load_model
from megatron_tr1.plan.params import stage_params, total_params

# (text_config, vision_config, tie_word_embeddings). head_dim apart from hidden / heads (as in Qwen3-VL-4B), GQA and
# MQA, DeepStack at one, two or no vision blocks, merge 1, attention_bias (q, k, v and o biased).
TINY = {
    "tied-gqa": (dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      intermediate_size=96, vocab_size=320, rope_parameters={"rope_type": "default",
                                                                              "mrope_section": [4, 4, 4]}),
                 dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 2]), True),
    "untied-mqa-bias": (dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                             head_dim=16, intermediate_size=40, vocab_size=200, attention_bias=True,
                             rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2]}),
                        dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=24, spatial_merge_size=1,
                             patch_size=8, temporal_patch_size=1, in_channels=1, num_position_embeddings=9,
                             deepstack_visual_indexes=[1]), False),
    "untied-no-deepstack": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 head_dim=16, intermediate_size=64, vocab_size=128,
                                 rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2]}),
                            dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=20,
                                 num_position_embeddings=4, deepstack_visual_indexes=[]), False),
}


def hf_config(text: dict, vision: dict, tied: bool) -> Qwen3VLConfig:
    return Qwen3VLConfig(text_config=text, vision_config={**vision, "out_hidden_size": text["hidden_size"]},
                         tie_word_embeddings=tied)


def hf_numel(config: Qwen3VLConfig, device: str = "cpu") -> int:
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", list(TINY))
def test_param_count_matches_transformers_module(name, tmp_path):
    config = hf_config(*TINY[name])
    config.save_pretrained(tmp_path)
    spec = load_model(str(tmp_path))
    assert spec.family == "qwen3_vl" and spec.text.qk_norm and spec.text.head_dim == TINY[name][0]["head_dim"]
    assert total_params(spec) == hf_numel(config)


def test_tie_word_embeddings_is_the_top_level_flag_as_transformers_reads_it(tmp_path):
    hf_config(*TINY["untied-mqa-bias"]).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["text_config"]["tie_word_embeddings"] = True  # as the released configs also write it; transformers ignores it
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = load_model(str(tmp_path))
    assert total_params(spec) == hf_numel(Qwen3VLConfig.from_pretrained(tmp_path))
    assert not spec.text.tied


# Published totals (Hugging Face's model pages: 2.13B, 4.44B, 8.77B params).
@pytest.mark.parametrize("name, published, billions", [("qwen3-vl-2b", 2_127_532_032, "2.13"),
                                                       ("qwen3-vl-4b", 4_437_815_808, "4.44"),
                                                       ("qwen3-vl-8b", 8_767_123_696, "8.77")])
def test_builtin_models_match_the_real_architecture(name, published, billions):
    spec = BUILTIN[name]
    t, v = spec.text, spec.vision
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=t.hidden, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                         num_key_value_heads=t.kv_heads, head_dim=t.head_dim, intermediate_size=t.ffn,
                         vocab_size=t.vocab),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden, num_heads=v.heads, intermediate_size=v.ffn,
                           out_hidden_size=v.out_hidden, deepstack_visual_indexes=list(v.deepstack)),
        tie_word_embeddings=t.tied)
    assert total_params(spec) == hf_numel(config, device="meta") == published
    assert f"{published / 1e9:.2f}" == billions


# By hand: head_dim 6 (q width 12 against hidden 8), one query group, no QKV bias, QK-norm; a GELU vision MLP,
# LayerNorms, a biased patch embedding, 9 learned positions and one DeepStack merger.
SMALL3 = ModelSpec("small3", TextSpec(hidden=8, layers=2, heads=2, kv_heads=1, ffn=12, vocab=16, tied=False,
                                      kv_channels=6, qkv_bias=False, qk_norm=True),
                   VisionSpec(depth=1, hidden=4, heads=2, ffn=6, out_hidden=8, patch=2, temporal_patch=1, merge=1,
                              in_channels=1, gated=False, layer_norm=True, patch_bias=True, pos_embeddings=9,
                              deepstack=(0,)), "qwen3_vl")
# decoder layer: sharded qkv 8 * (12 + 6 + 6) = 192, o 12 * 8 = 96, mlp 3 * 8 * 12 = 288 -> 576; replicated two
# RMSNorms 16 + q/k norms 2 * 6 = 28.
# vision block: sharded qkv 48 + 12, proj 16, fc1 24 + 6, fc2 24 -> 130; replicated proj and fc2 biases 8 + two
# LayerNorms 16 = 24. Mergers (width 4): sharded fc1 16 + 4, fc2 32 -> 52 each (main + DeepStack); replicated
# LayerNorm 8 + fc2 bias 8 -> 16 each. Patch 16 + bias 4 and positions 9 * 4 = 36: 56 replicated.
LAYER, LAYER_REP = 576, 28
VISION, VISION_REP = 130 + 2 * 52, 24 + 2 * 16 + 56
EMB, NORM = 16 * 8, 8


def test_small_qwen3_spec_counts_by_hand():
    assert total_params(SMALL3) == VISION + VISION_REP + EMB + 2 * (LAYER + LAYER_REP) + NORM + EMB == 1818
    assert stage_params(SMALL3, tp=2, pp=2) == [LAYER // 2 + LAYER_REP + VISION // 2 + VISION_REP + EMB // 2,
                                                LAYER // 2 + LAYER_REP + NORM + EMB // 2] == [609, 388]
    config = Qwen3VLConfig(  # the same shapes in transformers
        text_config=dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=6, intermediate_size=12, vocab_size=16,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=4, num_heads=2, intermediate_size=6, out_hidden_size=8,
                           patch_size=2, temporal_patch_size=1, spatial_merge_size=1, in_channels=1,
                           num_position_embeddings=9, deepstack_visual_indexes=[0]))
    assert hf_numel(config, device="meta") == 1818


def test_activations_use_the_query_width_qk_norm_and_the_gelu_mlp():
    w = Workload(seq_len=10, micro_batch=2, visual_tokens=3, gpu_mem_gib=1.0)
    (stage,) = stage_breakdowns(SMALL3, w, tp=2, pp=1, dp=1)
    # LM: 20 tokens * (8h 64 + 4q 48 + 4gd 24 + 6f 72 + QK-norm inputs 2q 24 + 2gd 12) / TP 2 = 2440 per layer (2);
    # vision: 6 patches * (8h 32 + 4q 16 + 4gd 16 + GELU 4f 24) / 2 = 264
    assert stage.act == 2 * 2440 + 264


def test_tp_rules_and_the_deepstack_pipeline_rule():
    big = BUILTIN["qwen3-vl-8b"]
    assert model_blockers(big, 8) == []  # vision FFN 4304 = 8 * 538; Qwen2.5-VL's 3420 is not
    assert text_blockers(BUILTIN["qwen3-vl-2b"], 16) == ["num_key_value_heads 8 is not divisible by 16"]
    # 36 layers; DeepStack feeds LM layers 0-2, so stage 0 needs at least 3: PP 18 (2 layers) and 36 (1) are out
    reason = ("DeepStack adds vision features to LM layers 0-2, which must sit on pipeline stage 0 with the vision "
              "tower, but 18 stages leave stage 0 2 of the 36 layers")
    assert excluded_pp(big) == {18: [reason], 36: [reason.replace("18 stages leave stage 0 2", "36 stages leave "
                                                                  "stage 0 1")]}
    layouts, _ = enumerate_layouts(big, gpus_per_node=2, nodes=18)
    assert Layout(1, 12, 3) in layouts and not {l.pp for l in layouts} & {18, 36}
    with pytest.raises(ConfigError, match=f"--pp 18 cannot split qwen3-vl-8b: {reason}"):
        enumerate_layouts(big, gpus_per_node=2, nodes=18, pp=18)
    qwen25, _ = enumerate_layouts(BUILTIN["qwen2.5-vl-3b"], gpus_per_node=2, nodes=18, pp=18)  # no DeepStack
    assert qwen25 and excluded_pp(BUILTIN["qwen2.5-vl-3b"]) == {}


def test_cli_plans_a_builtin_and_an_hf_dir(tmp_path, capsys):
    assert tr1(["plan", "--model", "qwen3-vl-8b", "--gpus-per-node", "8", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "params=8767123696\n" in out and "qwen3-vl-8b (Qwen3-VL)" in out
    assert "head_dim 128, QK-norm" in out and "DeepStack from blocks [8, 16, 24]" in out
    assert "planned only" not in out  # tr1 train / eval / convert / verify run Qwen3-VL too
    assert "excluded PP=18: DeepStack adds vision features to LM layers 0-2" in out
    assert "excluded TP=8" not in out and "recommended: TP=" in out
    config = hf_config(*TINY["tied-gqa"])
    config.save_pretrained(tmp_path)
    assert tr1(["plan", "--model", str(tmp_path), "--gpus-per-node", "2"]) == 0
    assert f"params={hf_numel(config)}\n" in capsys.readouterr().out


def _qwen3_json(**vision_changes) -> dict:
    text, vision, tied = TINY["tied-gqa"]
    return hf_config(text, {**vision, **vision_changes}, tied).to_dict()


@pytest.mark.parametrize("cfg, message", [
    ({**_qwen3_json(), "text_config": None}, "no text_config; a Qwen3-VL config.json holds text_config"),
    (_qwen3_json(deepstack_visual_indexes=[0, 3]), "vision_config.deepstack_visual_indexes = [0, 3]; expected "
                                                   "distinct vision layer indexes in [0, depth 3)"),
    (_qwen3_json(deepstack_visual_indexes=[1, 1]), "deepstack_visual_indexes = [1, 1]"),
    ({**_qwen3_json(depth=5, deepstack_visual_indexes=[0, 1, 2, 3])},
     "deepstack_visual_indexes has 4 entries, more than the 3 LM layers they feed"),
    ({**_qwen3_json(), "model_type": "qwen3_vl_moe"}, "model_type 'qwen3_vl_moe' is Qwen3-VL-MoE: its experts need "
                                                       "expert parallelism"),
    ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl' is not a model family tr1 knows ('qwen2_5_vl' (Qwen2.5-VL), "
                                 "'qwen3_vl' (Qwen3-VL))"),
], ids=["no-text-config", "deepstack-out-of-range", "deepstack-repeated", "deepstack-too-many", "moe", "unknown"])
def test_bad_qwen3_config_json_names_the_file_and_field(tmp_path, cfg, message):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=str(tmp_path)) as e:
        load_model(str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)
