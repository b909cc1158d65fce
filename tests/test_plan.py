"""The memory planner: parameter counts against real transformers modules, memory formulas against hand-computed
values, layout enumeration, the rollout engine's memory per rollout TP (by hand, the trainer's TP rules, the recipes),
config.json loading, bad input, and the ``tr1 plan`` output."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_tr1.cli import main as tr1
from megatron_tr1.errors import ConfigError
from megatron_tr1.plan.layouts import Layout, enumerate_layouts, rank_key, recommend
from megatron_tr1.plan.memory import GiB, Workload, stage_breakdowns
from megatron_tr1.plan.models import BUILTIN, ModelSpec, TextSpec, VisionSpec, load_model
from megatron_tr1.plan.params import stage_params, total_params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# (text_config, vision_config, tie_word_embeddings): tied GQA, untied MHA, untied MQA with odd vision shapes.
TINY = {
    "tied-gqa": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=320),
                 dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48), True),
    "untied-mha": (dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=80, vocab_size=200),
                   dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=24, spatial_merge_size=1), False),
    "untied-mqa": (dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1,
                        intermediate_size=40, vocab_size=256),
                   dict(depth=3, hidden_size=24, num_heads=3, intermediate_size=20, patch_size=7,
                        temporal_patch_size=1, in_channels=1), False),
}


def hf_config(text: dict, vision: dict, tied: bool) -> Qwen2_5_VLConfig:
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)


def hf_numel(config: Qwen2_5_VLConfig, device: str = "cpu") -> int:
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", list(TINY))
def test_param_count_matches_transformers_module(name, tmp_path):
    config = hf_config(*TINY[name])
    config.save_pretrained(tmp_path)  # transformers 5 layout: text_config + vision_config
    assert total_params(load_model(str(tmp_path))) == hf_numel(config)


def test_flat_legacy_config_json(tmp_path):
    text, vision, tied = TINY["untied-mqa"]
    vision = {**vision, "out_hidden_size": text["hidden_size"]}
    vision["in_chans"] = vision.pop("in_channels")  # the pre-v5 key
    flat = {"model_type": "qwen2_5_vl", **text, "tie_word_embeddings": tied, "vision_config": vision}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    spec = load_model(str(tmp_path))
    assert spec.vision.in_channels == 1 and spec.text.kv_heads == 1
    assert total_params(spec) == hf_numel(hf_config(*TINY["untied-mqa"]))


def test_tie_word_embeddings_inside_text_config_is_honoured(tmp_path):
    text, vision, _ = TINY["tied-gqa"]
    cfg = {"model_type": "qwen2_5_vl", "text_config": {**text, "tie_word_embeddings": True},
           "vision_config": {**vision, "out_hidden_size": text["hidden_size"]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).text.tied


@pytest.mark.parametrize("name, published, billions", [("qwen2.5-vl-3b", 3_754_622_976, "3.75"),
                                                       ("qwen2.5-vl-7b", 8_292_166_656, "8.29"),
                                                       ("qwen2.5-vl-72b", 73_406_351_360, "73.41")])
def test_builtin_models_match_the_real_architecture(name, published, billions):
    spec = BUILTIN[name]
    t, v = spec.text, spec.vision
    config = hf_config(
        dict(hidden_size=t.hidden, num_hidden_layers=t.layers, num_attention_heads=t.heads,
             num_key_value_heads=t.kv_heads, intermediate_size=t.ffn, vocab_size=t.vocab),
        dict(depth=v.depth, hidden_size=v.hidden, num_heads=v.heads, intermediate_size=v.ffn), t.tied)
    assert total_params(spec) == hf_numel(config, device="meta") == published
    assert f"{published / 1e9:.2f}" == billions  # the totals the model cards publish: 3.75B, 8.29B, 73.4B


# A spec small enough to count by hand: head_dim 2, q width 8, k/v width 4 each.
SMALL = ModelSpec("small", TextSpec(hidden=8, layers=2, heads=4, kv_heads=2, ffn=12, vocab=16, tied=False),
                  VisionSpec(depth=1, hidden=4, heads=2, ffn=6, out_hidden=8, patch=2, temporal_patch=1, merge=1,
                             in_channels=1))
# decoder layer: sharded qkv 8*16 + 16 bias, o 64, mlp 3*8*12 = 288 -> 496; replicated norms 16
# vision block: sharded qkv 48 + 12, proj 16, gate/up 2*(24 + 6), down 24 -> 160; replicated 2 biases + 2 norms = 16
# vision tower: patch 1*1*2*2*4 = 16 replicated; merger fc1 16 + 4 and fc2 32 sharded, ln 4 + fc2 bias 8 replicated
LAYER, LAYER_REP, VISION, VISION_REP = 496, 16, 160 + 52, 16 + 16 + 12
EMB, NORM = 16 * 8, 8


def test_small_spec_counts_by_hand():
    assert total_params(SMALL) == (VISION + VISION_REP) + EMB + 2 * (LAYER + LAYER_REP) + NORM + EMB == 1544
    assert stage_params(SMALL, tp=1, pp=1) == [1544]
    assert stage_params(SMALL, tp=2, pp=1) == [2 * (LAYER // 2 + LAYER_REP) + VISION // 2 + VISION_REP
                                               + EMB // 2 + NORM + EMB // 2]
    assert stage_params(SMALL, tp=2, pp=2) == [LAYER // 2 + LAYER_REP + VISION // 2 + VISION_REP + EMB // 2,
                                               LAYER // 2 + LAYER_REP + NORM + EMB // 2] == [478, 336]


def test_pipeline_stages_partition_the_model_and_tied_pp_keeps_an_output_copy():
    untied, tied = BUILTIN["qwen2.5-vl-7b"], BUILTIN["qwen2.5-vl-3b"]
    assert sum(stage_params(untied, tp=1, pp=4)) == total_params(untied)
    assert stage_params(tied, tp=1, pp=1) == [total_params(tied)]
    assert sum(stage_params(tied, tp=1, pp=2)) == total_params(tied) + tied.text.vocab * tied.text.hidden


def test_memory_formulas_by_hand():
    w = Workload(seq_len=10, micro_batch=2, visual_tokens=3, gpu_mem_gib=1.0, vllm_fraction=0.25)
    first, last = stage_breakdowns(SMALL, w, tp=2, pp=2, dp=2)
    # model states: bf16 weights, fp32 grads, 12 bytes of Adam state sharded over DP=2, bf16 reference copy
    assert (first.weights, first.grads, first.optimizer, first.ref) == (2 * 478, 4 * 478, 12 * 478 / 2, 2 * 478)
    assert (last.weights, last.grads, last.optimizer, last.ref) == (2 * 336, 4 * 336, 12 * 336 / 2, 2 * 336)
    # A_layer = s*b*(12h + 4gd + 6f)/TP: LM 20 tokens * (96 + 16 + 72) / 2 = 1840;
    # vision 2 * 3 patches * (48 + 16 + 36) / 2 = 300. Stage 0 holds PP = 2 micro-batches, stage 1 holds one.
    assert first.act == 2 * 1840 + 2 * 300
    assert last.act == 1840
    # full recompute: layer inputs 2*s*b*h/TP per layer and micro-batch in flight, plus one layer recomputed
    assert first.act_recompute == (2 * 20 * 8 * 2 / 2 + 1840) + (2 * 6 * 4 * 2 / 2 + 300)
    assert last.act_recompute == 20 * 8 * 2 / 2 + 1840
    # logits on the last stage only: fused 3 passes x 20 tokens x 3 fp32 stats; unfused 3 x 20 x V/TP x 4 bytes
    assert (first.logits_fused, first.logits_unfused) == (0, 0)
    assert (last.logits_fused, last.logits_unfused) == (3 * 20 * 3 * 4, 3 * 20 * 8 * 4)
    states = 2 * 336 + 4 * 336 + 6 * 336 + 2 * 336
    assert last.train == states + 1840 + 720
    assert last.peak_awake == last.train + GiB / 4
    assert last.peak_sleep == states + GiB / 4  # rollout phase: resident states + the awake engine
    opts = Workload(seq_len=10, micro_batch=2, visual_tokens=3, gpu_mem_gib=1.0, vllm_fraction=0.0, recompute=True,
                    fused_logits=False, vllm_sleep=False)
    _, last = stage_breakdowns(SMALL, opts, tp=2, pp=2, dp=2)
    assert last.peak == last.peak_awake == states + (20 * 8 + 1840) + 3 * 20 * 8 * 4


def test_a_token_budget_sizes_activations_and_log_probs_by_its_tokens():
    """Packed micro-batches (optim.max_tokens_per_micro_batch): the LM and the log-probs see the budget's tokens, the
    vision tower the patches of the sequences it can hold (at most --micro-batch of them)."""
    padded = Workload(seq_len=10, micro_batch=2, visual_tokens=3, gpu_mem_gib=1.0, vllm_fraction=0.25)
    same = dataclasses.replace(padded, tokens_per_micro_batch=20)  # 2 full sequences: the padded micro-batch
    numbers = ("act", "act_recompute", "logits_fused", "logits_unfused", "train", "peak")
    assert [[getattr(b, k) for k in numbers] for b in stage_breakdowns(SMALL, same, 2, 2, 2)] == \
        [[getattr(b, k) for k in numbers] for b in stage_breakdowns(SMALL, padded, 2, 2, 2)]
    first, last = stage_breakdowns(SMALL, dataclasses.replace(padded, tokens_per_micro_batch=14), 2, 2, 2)
    # LM: 14 tokens * (96 + 16 + 72) / 2 = 1288 (20 tokens: 1840); vision: still 2 sequences' 2 * 3 patches: 300
    assert (first.act, last.act) == (2 * 1288 + 2 * 300, 1288)
    assert last.logits_fused == 3 * 14 * 3 * 4
    one = dataclasses.replace(padded, tokens_per_micro_batch=5)  # holds one sequence's 3 visual tokens
    assert one.patches == 3 and dataclasses.replace(padded, micro_batch=1).patches == 3


def test_layouts_respect_divisibility():
    spec = BUILTIN["qwen2.5-vl-3b"]  # 2 query groups, 36 layers
    layouts, excluded = enumerate_layouts(spec, gpus_per_node=8, nodes=1)
    assert {l.tp for l in layouts} == {1, 2} and set(excluded) == {4, 8}
    assert "num_key_value_heads 2 is not divisible by 4" in excluded[4][0]
    assert {(l.tp, l.pp) for l in layouts} == {(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4)}
    assert all(l.tp * l.pp * l.dp == 8 and 36 % l.pp == 0 for l in layouts)

    big, excluded = enumerate_layouts(BUILTIN["qwen2.5-vl-72b"], gpus_per_node=8, nodes=4)
    assert excluded == {8: ["vision intermediate_size 3420 is not divisible by 8"]}
    assert Layout(4, 8, 1) in big and all(80 % l.pp == 0 and l.tp * l.pp * l.dp == 32 for l in big)

    _, excluded = enumerate_layouts(BUILTIN["qwen2.5-vl-7b"], gpus_per_node=6, nodes=1)  # 28 heads
    assert set(excluded) == {3, 6} and "num_attention_heads 28 is not divisible by 3" in excluded[3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=4), "--tp 4 cannot shard qwen2.5-vl-3b: num_key_value_heads 2"),
    (dict(tp=16), "--tp 16: must be between 1 and --gpus-per-node 8"),
    (dict(pp=5), "--pp 5: must divide the 36 decoder layers"),
    (dict(tp=2, pp=3), "--tp 2 x --pp 3 = 6 does not divide the 8 GPUs"),
    (dict(pp=9), "--pp 9 does not divide the 8 GPUs"),
])
def test_pinned_layouts_that_cannot_run_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        enumerate_layouts(BUILTIN["qwen2.5-vl-3b"], gpus_per_node=8, nodes=1, **kwargs)


def test_recommendation_is_the_smallest_fitting_model_parallel_size_preferring_tp():
    assert sorted([Layout(1, 2, 4), Layout(2, 2, 2), Layout(2, 1, 4), Layout(1, 1, 8)], key=rank_key) == [
        Layout(1, 1, 8), Layout(2, 1, 4), Layout(1, 2, 4), Layout(2, 2, 2)]
    spec = BUILTIN["qwen2.5-vl-3b"]
    layouts, _ = enumerate_layouts(spec, gpus_per_node=8, nodes=1)

    def best(**kw):
        w = Workload(**kw)
        rows = [(l, stage_breakdowns(spec, w, l.tp, l.pp, l.dp)) for l in layouts]
        return recommend(rows, w.usable_bytes)

    assert best(gpu_mem_gib=1000) == Layout(1, 1, 8)
    assert best() == Layout(2, 1, 4)  # TP 1 needs 73.2 GiB at its peak, over the 72 GiB usable
    assert best(gpu_mem_gib=10) is None


def test_cli_prints_table_params_and_recommendation(capsys):
    assert tr1(["plan", "--model", "qwen2.5-vl-3b", "--gpus-per-node", "8", "--nodes", "1", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "params=3754622976\n" in out
    assert "excluded TP=4" in out and "peak sleep" in out
    assert "excluded rollout TP=4: num_key_value_heads 2 is not divisible by 4" in out
    assert "rollout TP (GiB/GPU)" in out and "seqs/replica" in out
    # 3B rollout TP 1: 8 replicas x 2 prompts x n=8; 7.0 GiB weights + 3.4 KV + 2.0 overhead = 12.4 of 40
    assert ("recommended: TP=2 PP=1 DP=4 (peak 59.2 GiB of 72.0 GiB usable), rollout TP=1: 8 replicas x 16 "
            "sequences, 12.4 GiB of the 40.0 GiB vLLM share\n") in out


def test_cli_reads_an_hf_dir(tmp_path, capsys):
    config = hf_config(*TINY["tied-gqa"])
    config.save_pretrained(tmp_path)
    assert tr1(["plan", "--model", str(tmp_path), "--gpus-per-node", "2", "--recompute"]) == 0
    assert f"params={hf_numel(config)}\n" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "qwen2.5-vl-9b"], "'qwen2.5-vl-9b' is neither a known model (qwen2.5-vl-3b, qwen2.5-vl-7b, "
                                   "qwen2.5-vl-72b, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b)"),
    (["--model", "{tmp}"], "{tmp}/config.json not found"),
    (["--model", "qwen2.5-vl-3b", "--nodes", "0"], "--gpus-per-node 8 and --nodes 0 must both be at least 1"),
    (["--model", "qwen2.5-vl-3b", "--vllm-mem-fraction", "1.5"], "--vllm-mem-fraction 1.5: must be in [0, 1)"),
    (["--model", "qwen2.5-vl-3b", "--seq-len", "0"], "--seq-len 0: must be at least 1"),
    (["--model", "qwen2.5-vl-3b", "--seq-len", "100"], "--visual-tokens 2048: must be between 0 and --seq-len 100"),
    (["--model", "qwen2.5-vl-3b", "--gpu-mem", "-1"], "--gpu-mem -1.0: must be a positive number of GiB"),
    (["--model", "qwen2.5-vl-7b", "--nodes", "1", "--rollout-tp", "3"],
     "--rollout-tp 3 (rollout.tensor_parallel) does not divide the world size 8"),
    (["--model", "qwen2.5-vl-7b", "--nodes", "1", "--rollout-tp", "8"],  # the vision tower is no reason
     ("--rollout-tp 8 (rollout.tensor_parallel) cannot shard qwen2.5-vl-7b: num_attention_heads 28 is not divisible "
      "by 8; num_key_value_heads 4 is not divisible by 8\n")),
    (["--model", "qwen2.5-vl-3b", "--rollout-tp", "4"],
     "--rollout-tp 4 (rollout.tensor_parallel) cannot shard qwen2.5-vl-3b: num_key_value_heads 2 is not divisible"),
    (["--model", "qwen2.5-vl-72b", "--nodes", "4", "--rollout-tp", "16"],
     ("--rollout-tp 16 (rollout.tensor_parallel) cannot shard qwen2.5-vl-72b: num_key_value_heads 8 is not divisible "
      "by 16\n")),
    (["--model", "qwen2.5-vl-3b", "--rollout-tp", "0"], "--rollout-tp 0: must be at least 1"),
    (["--model", "qwen2.5-vl-3b", "--tokens-per-micro-batch", "4096"],
     "--tokens-per-micro-batch 4096: must hold one whole sequence (--seq-len 6144)"),
    (["--model", "qwen2.5-vl-3b", "--rollout-prompts", "0"], "--rollout-prompts 0: must be at least 1"),
    (["--model", "qwen2.5-vl-3b", "--rollout-n", "0"], "--rollout-n 0: must be at least 1"),
    (["--model", "qwen2.5-vl-3b", "--rollout-batch", "0"], "--rollout-batch 0: must be at least 1"),
    (["--model", "qwen2.5-vl-3b", "--rollout-overhead", "-1"],
     "--rollout-overhead -1.0: must be a non-negative number of GiB"),
])
def test_bad_input_is_one_line_naming_field_and_value(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert tr1(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err


@pytest.mark.parametrize("cfg, message", [
    ("{", "cannot read it as JSON"),
    ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl' is not a model family tr1 knows ('qwen2_5_vl'"),
    ({"hidden_size": 64}, "has no 'num_hidden_layers'"),
    ({**TINY["tied-gqa"][0], "vocab_size": 0}, "text.vocab_size = 0; expected a positive integer"),
    ({**TINY["tied-gqa"][0], "vision_config": {"out_hidden_size": 32}},
     "vision_config.out_hidden_size 32 must equal the language hidden_size 64"),
])
def test_bad_config_json_names_the_file_and_field(tmp_path, cfg, message):
    (tmp_path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    with pytest.raises(ConfigError, match=str(tmp_path)) as e:
        load_model(str(tmp_path))
    assert message in str(e.value)
