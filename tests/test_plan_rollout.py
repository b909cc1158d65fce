"""``tr1 plan``'s rollout side (``plan/rollout.py``): the vLLM engine's weights, KV cache and overhead per rollout TP,
the TP rules it shares with the trainer, and the recipes' rollout layouts. The training side: tests/test_plan.py."""
import dataclasses
import re

import pytest

from megatron_tr1.cli import main as tr1
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.size import Dims
from megatron_tr1.plan.layouts import Layout, enumerate_layouts, model_blockers, recommend, text_blockers, vision_blockers
from megatron_tr1.plan.memory import GiB, Workload, max_vllm_share, stage_breakdowns
from megatron_tr1.plan.models import BUILTIN
from megatron_tr1.plan.params import total_params, vision_tower
from megatron_tr1.plan.rollout import (engine_params, language_params, pick_rollout, rollout_blockers,
                                       rollout_estimate, rollout_options)
from megatron_tr1.rl.config import load_train_config

from tests.test_plan import EMB, EXAMPLES, LAYER, LAYER_REP, NORM, SMALL, VISION, VISION_REP, hf_config

# ---------------------------------------------------------------- the rollout engine (plan/rollout.py)

# SMALL's engine: sharded = vision 212 + embedding 128 + 2 layers x 496 + LM head 128 = 1460;
# replicated = vision 44 + 2 layers x 16 + final norm 8 = 84 (1544 in all, the model)
ENGINE_SHARDED, ENGINE_REP = VISION + EMB + 2 * LAYER + EMB, VISION_REP + 2 * LAYER_REP + NORM


def test_rollout_estimate_by_hand():
    assert (engine_params(SMALL).sharded, engine_params(SMALL).replicated) == (ENGINE_SHARDED, ENGINE_REP) == (1460, 84)
    w = Workload(seq_len=10, gpu_mem_gib=1.0, vllm_fraction=0.5, rollout_prompts=3, rollout_n=2,
                 rollout_overhead_gib=0.25)
    r = rollout_estimate(SMALL, w, tp=2, world=4)
    # 2 replicas; each generates ceil(3 / 2) = 2 prompts x n=2 = 4 sequences
    assert (r.tp, r.replicas, r.prompts, r.seqs) == (2, 2, 2, 4)
    assert r.weights == 2 * (ENGINE_SHARDED // 2 + ENGINE_REP) == 1628  # bf16, the whole model / TP
    # KV per token and GPU: 2 layers x (K, V) x 2 kv heads / TP 2 x head_dim 2 x 2 bytes = 16 bytes
    assert r.kv == 4 * 10 * (2 * 2 * 1 * 2 * 2) == 640
    assert (r.overhead, r.share) == (GiB / 4, GiB / 2)
    assert r.need == 1628 + 640 + GiB / 4 and r.fits
    one = rollout_estimate(SMALL, w, tp=1, world=4)  # 4 replicas: 1 prompt x 2 = 2 sequences each, 32 bytes/token
    assert (one.replicas, one.seqs, one.weights, one.kv) == (4, 2, 2 * 1544, 2 * 10 * 32)
    fixed = rollout_estimate(SMALL, dataclasses.replace(w, rollout_batch=5), tp=2, world=4)  # --rollout-batch 5
    assert (fixed.prompts, fixed.seqs, fixed.kv) == (None, 5, 5 * 10 * 16)
    tight = dataclasses.replace(w, rollout_overhead_gib=0.5)  # 0.5 GiB overhead + weights + KV > 0.5 GiB share
    assert not rollout_estimate(SMALL, tight, tp=2, world=4).fits
    assert pick_rollout(rollout_options(SMALL, tight, world=4)[0]) is None


def test_engine_holds_the_whole_model():
    for spec in BUILTIN.values():
        assert engine_params(spec).total == total_params(spec)


# SMALL with a vision FFN of 5: TP 2 splits the language model but not the vision tower (5 is odd), so the rollout
# engine runs the tower whole. Its block: qkv 48 + 12, proj 16, gate/up 2 * (20 + 5), down 20 -> 146 sharded, 16
# replicated; the tower: 146 + merger 52 sharded, patch 16 + block 16 + merger 12 replicated = 242 in all.
ODD_VISION = dataclasses.replace(SMALL, vision=dataclasses.replace(SMALL.vision, ffn=5))
ODD_VISION_TOTAL = 146 + 52 + 16 + 16 + 12


def test_vision_whole_estimate_by_hand():
    assert vision_tower(ODD_VISION.vision).total == ODD_VISION_TOTAL == 242
    assert vision_blockers(ODD_VISION, 2) == ["vision intermediate_size 5 is not divisible by 2"]
    assert text_blockers(ODD_VISION, 2) == [] and rollout_blockers(ODD_VISION, 2, world=4) == []
    assert model_blockers(ODD_VISION, 2)  # training TP 2 is still refused (megatron splits the tower)
    lm = language_params(ODD_VISION)
    assert (lm.sharded, lm.replicated) == (EMB + 2 * LAYER + EMB, 2 * LAYER_REP + NORM) == (1248, 40)
    w = Workload(seq_len=10, gpu_mem_gib=1.0, rollout_prompts=3, rollout_n=2, rollout_overhead_gib=0.25)
    r = rollout_estimate(ODD_VISION, w, tp=2, world=4)
    assert r.vision_whole and r.label == "TP=2 (vision whole)"
    # bf16: the language model halved, the vision tower undivided; KV as for SMALL (the tower holds none)
    assert r.weights == 2 * (1248 // 2 + 40 + 242) == 1812
    assert r.kv == 4 * 10 * 16 and r.fits
    assert r.describe().startswith("TP=2 (vision whole) needs ")
    split = rollout_estimate(SMALL, w, tp=2, world=4)  # the same TP, the tower split: not whole
    assert not split.vision_whole and split.label == "TP=2" and split.weights == 1628
    options, excluded = rollout_options(ODD_VISION, w, world=4)
    assert [(o.tp, o.vision_whole) for o in options] == [(1, False), (2, True)]  # TP 4: KV heads 2
    assert excluded == {4: ["num_key_value_heads 2 is not divisible by 4"]}
    assert rollout_options(ODD_VISION, w, world=4, tp=2)[0][0].vision_whole  # --rollout-tp 2 is accepted


@pytest.mark.parametrize("name", [name for name, spec in BUILTIN.items() if spec.family == "qwen2_5_vl"])
def test_rollout_tp_rules_are_the_trainers(name):
    """The planner rules out exactly the rollout TP sizes the trainer refuses (``Dims.validate(..., vision=False)`` in
    rl/trainer.py), and counts the vision tower whole exactly where the trainer runs it data-parallel in vLLM
    (``Dims.vision_splits``)."""
    spec = BUILTIN[name]
    t, v = spec.text, spec.vision
    dims = Dims.from_hf_config(hf_config(
        dict(hidden_size=t.hidden, num_hidden_layers=t.layers, num_attention_heads=t.heads,
             num_key_value_heads=t.kv_heads, intermediate_size=t.ffn, vocab_size=t.vocab),
        dict(depth=v.depth, hidden_size=v.hidden, num_heads=v.heads, intermediate_size=v.ffn), t.tied))
    vision = vision_tower(v)
    for tp in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        try:
            dims.validate(tp, 1, "rollout.tensor_parallel={}", "", vision=False)
            refused = False
        except ConfigError:
            refused = True
        assert refused == bool(rollout_blockers(spec, tp, world=tp)), (name, tp)
        if refused:
            continue
        r = rollout_estimate(spec, Workload(), tp, world=tp)
        assert r.vision_whole == bool(dims.vision_splits(tp)) == bool(vision_blockers(spec, tp)), (name, tp)
        tower = vision.total if r.vision_whole else vision.per_gpu(tp)
        assert r.weights == 2 * (language_params(spec).per_gpu(tp) + tower), (name, tp)
        try:  # training (megatron splits the tower too) keeps the full rule
            dims.validate(tp, 1)
            assert not model_blockers(spec, tp)
        except ConfigError:
            assert model_blockers(spec, tp)


def test_rollout_tp_must_divide_kv_heads_vocab_and_world():
    w = Workload()
    options, excluded = rollout_options(BUILTIN["qwen2.5-vl-72b"], w, world=32)
    # 64 heads, 8 KV heads, vocab 152064, FFN 29568; the vision FFN 3420 at TP 8 runs the tower whole
    assert [(r.tp, r.vision_whole) for r in options] == [(1, False), (2, False), (4, False), (8, True)]
    assert excluded == {16: ["num_key_value_heads 8 is not divisible by 16"],
                        32: ["num_key_value_heads 8 is not divisible by 32"]}
    odd_vocab = dataclasses.replace(SMALL, text=dataclasses.replace(SMALL.text, vocab=15))
    with pytest.raises(ConfigError, match=r"--rollout-tp 2 \(rollout.tensor_parallel\) cannot shard small: "
                                          r"vocab_size 15 is not divisible by 2"):
        rollout_options(odd_vocab, w, world=4, tp=2)
    with pytest.raises(ConfigError, match=r"--rollout-tp 4 \(rollout.tensor_parallel\) does not divide the world "
                                          r"size 6"):
        rollout_options(SMALL, w, world=6, tp=4)


def test_72b_rollout_tp_8_counts_the_vision_tower_whole():
    spec, w = BUILTIN["qwen2.5-vl-72b"], Workload()
    r = rollout_estimate(spec, w, tp=8, world=64)
    vision = vision_tower(spec.vision)
    assert r.vision_whole and vision.total == 700_147_712  # 1.3 GiB of bf16 on every GPU
    assert r.weights == 2 * (language_params(spec).per_gpu(8) + vision.total)
    # what a split tower would hold less: 7/8 of its sharded parameters
    assert r.weights - 2 * engine_params(spec).per_gpu(8) == 2 * vision.sharded * 7 // 8
    assert (round(r.weights / GiB, 1), round(r.kv / GiB, 1), round(r.need / GiB, 1)) == (18.2, 3.8, 24.0)


def test_recommend_needs_a_fitting_rollout():
    spec = BUILTIN["qwen2.5-vl-3b"]
    w = Workload()
    layouts, _ = enumerate_layouts(spec, gpus_per_node=8, nodes=1)
    rows = [(l, stage_breakdowns(spec, w, l.tp, l.pp, l.dp)) for l in layouts]
    assert recommend(rows, w.usable_bytes, rollout_fits=lambda l: True) == recommend(rows, w.usable_bytes)
    assert recommend(rows, w.usable_bytes, rollout_fits=lambda l: False) is None
    # with sleep mode vLLM sits beside the resident model states: TP 2's states are 19.2 GiB of 72 usable
    stages = dict(rows)[Layout(2, 1, 4)]
    assert max_vllm_share(stages) == pytest.approx(72 * GiB - stages[0].states)
    assert max_vllm_share(stages) / GiB == pytest.approx(52.8, abs=0.05)


def _plan(capsys, *argv) -> str:
    assert tr1(["plan", "--gpus-per-node", "8", "--gpu-mem", "80", *argv]) == 0
    return capsys.readouterr().out


def test_72b_rollout_on_4_nodes_is_refused_with_the_numbers(capsys):
    """72B on 4 x 8 x 80 GB at the recipe's settings: rollout TP 8 runs with the vision tower whole and needs 27.7 GiB
    for a replica's 32 sequences, more than any layout leaves beside training (at most 22.0 GiB), so nothing is
    recommended; the refusal names every rollout TP's numbers, and a hint gives the --rollout-batch that fits."""
    out = _plan(capsys, "--model", "qwen2.5-vl-72b", "--nodes", "4", "--recompute", "--vllm-mem-fraction", "0.25")
    assert ("rollout TP=8: vision whole: vision intermediate_size 3420 is not divisible by 8, so vLLM runs the vision "
            "tower data-parallel (mm_encoder_tp_mode=data): its 1.3 GiB of bf16 weights undivided on every "
            "GPU\n") in out
    assert ("rollout: refused: no rollout TP fits the vLLM share of 20.0 GiB per GPU (--vllm-mem-fraction 0.25 x 80 "
            "GiB): TP=1 needs 153.7 GiB (136.7 weights + 15.0 KV for 8 sequences + 2.0 overhead), TP=2 needs 77.9 GiB "
            "(68.4 weights + 7.5 KV for 8 sequences + 2.0 overhead), TP=4 needs 43.7 GiB (34.2 weights + 7.5 KV for "
            "16 sequences + 2.0 overhead), TP=8 (vision whole) needs 27.7 GiB (18.2 weights + 7.5 KV for 32 sequences "
            "+ 2.0 overhead); ruled out: TP=16 (num_key_value_heads 8 is not divisible by 16), TP=32 "
            "(num_key_value_heads 8 is not divisible by 32)\n") in out
    assert "training alone: recommended: TP=4 PP=8 DP=1 (peak 70.0 GiB of 72.0 GiB usable)\n" in out
    assert "recommended: none; the rollout engine fits beside no layout" in out
    assert ("hint: no --vllm-mem-fraction helps: the smallest rollout need is 27.7 GiB (rollout TP=8 (vision whole)) "
            "and the roomiest layout leaves 22.0 GiB beside training") in out
    assert ("hint: --rollout-batch 5 --vllm-mem-fraction 0.27 gives TP=4 PP=8 DP=1 with rollout TP=8 (vision whole) "
            "(21.4 GiB of 21.6): 5 of the replica's 32 sequences in flight, vLLM queues the rest (slower)\n") in out
    # the rollout table marks the tower: split at TP 1, 2, 4; whole at TP 8
    rows = re.findall(r"│\s+(\d+) │\s+(split|whole) │", out)
    assert rows == [("1", "split"), ("2", "split"), ("4", "split"), ("8", "whole")]
    # the hint's settings fit, with the numbers it quoted
    out = _plan(capsys, "--model", "qwen2.5-vl-72b", "--nodes", "4", "--recompute", "--vllm-mem-fraction", "0.27",
                "--rollout-batch", "5")
    assert ("recommended: TP=4 PP=8 DP=1 (peak 71.6 GiB of 72.0 GiB usable), rollout TP=8 (vision whole): 4 replicas "
            "x 5 sequences, 21.4 GiB of the 21.6 GiB vLLM share\n") in out
    # rollout TP 1 (a whole 147 GB bf16 engine per GPU) is refused by itself, with no --rollout-batch that helps
    out = _plan(capsys, "--model", "qwen2.5-vl-72b", "--nodes", "4", "--recompute", "--vllm-mem-fraction", "0.25",
                "--rollout-tp", "1")
    assert ("rollout: refused: rollout TP=1 does not fit the vLLM share of 20.0 GiB per GPU (--vllm-mem-fraction 0.25 "
            "x 80 GiB): TP=1 needs 153.7 GiB (136.7 weights + 15.0 KV for 8 sequences + 2.0 overhead)\n") in out
    assert "recommended: none" in out and "--rollout-batch 1" not in out and "hint: --rollout-batch" not in out


def test_72b_rollout_on_8_nodes(capsys):
    out = _plan(capsys, "--model", "qwen2.5-vl-72b", "--nodes", "8", "--recompute", "--vllm-mem-fraction", "0.25")
    assert ("hint: --vllm-mem-fraction 0.30 gives TP=4 PP=8 DP=2 with rollout TP=8 (vision whole) (24.0 GiB of 24.0; "
            "that layout leaves at most 37.0 GiB for vLLM)\n") in out
    # vLLM 0.5: the smallest rollout TP that fits is 4, with no margin (TP 8 fits too)
    out = _plan(capsys, "--model", "qwen2.5-vl-72b", "--nodes", "8", "--recompute")
    assert ("recommended: TP=4 PP=16 DP=1 (peak 69.5 GiB of 72.0 GiB usable), rollout TP=4: 16 replicas x 8 "
            "sequences, 39.9 GiB of the 40.0 GiB vLLM share\n") in out


def _recipe(size: str):
    path = EXAMPLES / f"qwen2_5_vl_{size}_charades.yaml"
    cfg = load_train_config(path)
    nodes = int(re.search(r"^NODES=\$\{NODES:-(\d+)\}", path.with_suffix(".sh").read_text(), re.M).group(1))
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    w = Workload(seq_len=seq, recompute=cfg.model.recompute == "full", gpu_mem_gib=80.0,
                 vllm_fraction=cfg.rollout.gpu_memory_utilization, rollout_prompts=cfg.rollout.prompts_per_step,
                 rollout_n=cfg.rollout.n)
    return cfg, nodes * 8, w


@pytest.mark.parametrize("size, model", [("3b", "qwen2.5-vl-3b"), ("7b", "qwen2.5-vl-7b")])
def test_3b_7b_recipes_roll_out_at_the_planners_rollout_tp_on_every_gpu(size, model):
    cfg, world, w = _recipe(size)
    rollout_tp = cfg.rollout.tensor_parallel or cfg.model.tensor_parallel
    pick = pick_rollout(rollout_options(BUILTIN[model], w, world)[0])
    assert pick is not None and pick.tp == rollout_tp == 1  # the smallest rollout TP that fits: most replicas
    assert pick.replicas * pick.tp == world == 8  # every GPU hosts a rollout worker
    assert pick.seqs == 16 and pick.need <= pick.share  # 16 prompts x n=8 over 8 replicas


RECIPE_72B_PLAN = ("recommended: TP=4 PP=8 DP=2 (peak 63.0 GiB of 72.0 GiB usable), rollout TP=8 (vision whole): 8 "
                   "replicas x 16 sequences, 24.0 GiB of the 28.0 GiB vLLM share")


def test_72b_recipe_rollout_fits_at_its_rollout_tp(capsys):
    """The 72B recipe (8 nodes): the planner's rollout TP is the recipe's (8, the vision tower whole, one replica per
    node), and it fits its vLLM share; the recipe's own plan command recommends that layout."""
    cfg, world, w = _recipe("72b")
    assert world == 64
    spec = BUILTIN["qwen2.5-vl-72b"]
    options, _ = rollout_options(spec, w, world)
    pick = pick_rollout(options)
    assert pick is not None and pick.tp == cfg.rollout.tensor_parallel == 8 and pick.vision_whole
    assert (pick.replicas, pick.seqs) == (8, 16)  # 16 prompts x n=8 over 8 replicas: all in flight
    assert (round(pick.need / GiB, 1), pick.share / GiB) == (24.0, 28.0) and pick.fits
    assert not rollout_estimate(spec, w, 4, world).fits  # rollout TP 4 (39.9 GiB) does not
    text = (EXAMPLES / "qwen2_5_vl_72b_charades.yaml").read_text()
    command = re.search(r"^#\s+tr1 (plan .*)$", text, re.M).group(1).split()
    assert tr1(command) == 0
    out = capsys.readouterr().out
    assert RECIPE_72B_PLAN + "\n" in out
    quoted = " ".join(line.lstrip("#").strip() for line in text.split("run_dir:")[0].splitlines())
    assert RECIPE_72B_PLAN in quoted.replace("-> ", "")
    # the same settings on 4 nodes do not fit: the recipe says so and names what would
    cfg4 = dataclasses.replace(w, vllm_fraction=0.27, rollout_batch=5)
    four = rollout_estimate(spec, cfg4, 8, 32)
    assert four.fits and (round(four.need / GiB, 1), round(four.share / GiB, 1)) == (21.4, 21.6)
    at4 = rollout_estimate(spec, w, 8, 32)  # 4 replicas x 32 sequences: 27.7 GiB, more than TP 4 x PP 8 leaves
    room = max_vllm_share(stage_breakdowns(spec, w, 4, 8, 1))
    assert round(at4.need / GiB, 1) == 27.7 and round(room / GiB, 1) == 22.0 and at4.need > room >= four.share
    assert "--rollout-batch 5" in text and "rollout.gpu_memory_utilization=0.27" in text
