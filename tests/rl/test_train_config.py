import typing
from pathlib import Path

import pytest

from megatron_tr1.errors import ConfigError
from megatron_tr1.rl.config import AlgorithmConfig, TrainConfig, check_layout, load_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_synthetic_tiny_yaml_is_the_embedded_default():
    assert load_train_config(EXAMPLES / "synthetic_tiny.yaml") == TrainConfig() == load_train_config()


def test_qwen_3b_charades_yaml_has_temporal_r1_settings():
    cfg = load_train_config(EXAMPLES / "qwen2_5_vl_3b_charades.yaml")
    assert (cfg.data.max_prompt_tokens, cfg.rollout.max_tokens) == (4096, 2048)
    assert (cfg.data.video.total_pixels, cfg.data.video.min_pixels, cfg.data.video.fps) == (1605632, 3136, 2.0)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.temperature) == (16, 8, 1.0)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.warmup_steps) == (1e-6, 1e-2, 1.0, 0)
    a = cfg.algorithm
    assert (a.entropy_coef, a.kl_type, a.kl_coef, a.kl_in_reward) == (1e-3, "low_var_kl", 1e-2, False)
    # the seed's objective: plain GRPO, no rollout correction, EasyR1's per-micro-batch token-mean
    assert (a.loss_type, a.rollout_correction, a.agg, a.agg_scope) == ("grpo", "none", "token-mean", "micro-batch")
    g = cfg.stages.grpo  # a budget in episodes at optim.lr: the demo stage's steps and lr are switched off
    assert (g.episodes, g.steps, g.lr) == (15, 0, None) and not cfg.stages.sft.enabled and not cfg.stages.base.enabled
    assert (g.lr or cfg.optim.lr) == 1e-6 and g.total_steps(5338, 16) == 5005  # 15 passes over Charades-STA train
    assert cfg.optim.global_batch_size == 16 * 8  # global batch 16 prompts
    # data configs resolve against the YAML's folder
    assert cfg.data.train == str(EXAMPLES / "data" / "charades_tvg_train.yaml")
    assert check_layout(cfg, world_size=8) == 4  # TP 2 -> DP 4


def test_overrides_reach_every_section():
    cfg = load_train_config(None, ["rollout.n=16", "algorithm.think=false", "optim.lr=1e-5",
                                   "model.tiny.hidden_size=64", "stages.sft.enabled=false", "data.video.fps=1"])
    assert cfg.rollout.n == 16 and cfg.optim.lr == 1e-5 and cfg.model.tiny.hidden_size == 64
    assert cfg.algorithm.reward_name() == "tvg_no_think" and cfg.algorithm.reward_name(think=True) == "tvg"
    assert not cfg.stages.sft.enabled and cfg.data.video.fps == 1.0


@pytest.mark.parametrize("override, message", [
    (["rollout.n=1"], r"rollout: n=1: GRPO .* n >= 2"),
    (["optim.micro_batch_size=3"], r"stages.base.global_batch_size=32 must be divisible by "
                                   r"optim.micro_batch_size x data parallel = 3 x 1"),
    (["optim.micro_batch_size=24", *(f"stages.{s}.enabled=false" for s in ("base", "sft"))],
     r"optim.global_batch_size=64 must be divisible by optim.micro_batch_size x data parallel = 24 x 1"),
    (["stages.sft.global_batch_size=20"], r"stages.sft.global_batch_size=20 must be divisible"),
    (["optim.global_batch_size=48"], r"rollout.prompts_per_step x rollout.n = 64 .* multiple of "
                                     r"optim.global_batch_size=48"),
    (["algorithm.reward=iou"], r"algorithm: reward='iou' is not one of"),
    (["algorithm.kl_type=k9"], r"algorithm.kl_type: 'k9' is not one of"),
    (["algorithm.loss_type=ppo"], r"algorithm.loss_type: 'ppo' is not one of"),
    (["algorithm.agg_scope=batch"], r"algorithm.agg_scope: 'batch' is not one of"),
    (["algorithm.rollout_correction=is"], r"algorithm.rollout_correction: 'is' is not one of"),
    (["algorithm.rollout_cap=0.5"], r"algorithm: rollout_cap=0.5 must be > 1"),
    (["algorithm.loss_type=cispo", "algorithm.clip_dual=3"], r"algorithm: clip_dual=3.0 is for loss_type=grpo only"),
    (["stages.grpo.steps=0"], r"stages.grpo: an enabled stage needs steps > 0 or episodes > 0"),
    (["data.video.total_pixels=100"], r"data.video: total_pixels=100 < min_pixels=3136"),
    (["rollout.temperature=0"], r"temperature=0.0 must be > 0"),
    (["optim.max_tokens_per_micro_batch=570"], r"max_tokens_per_micro_batch=570 is less than "
                                               r"data.max_prompt_tokens \+ rollout.max_tokens = 576"),
    (["model.freeze_vision=true", "model.freeze_merger=true", "model.freeze_llm=true"], "nothing would be trained"),
])
def test_bad_values_name_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, override)


def test_loss_options_match_the_kernel():
    from kernels.reference import AGG_MODES, KL_TYPES, LOSS_TYPES, ROLLOUT_CORRECTIONS

    hints = typing.get_type_hints(AlgorithmConfig)
    assert typing.get_args(hints["kl_type"]) == KL_TYPES and typing.get_args(hints["agg"]) == AGG_MODES
    assert typing.get_args(hints["loss_type"]) == LOSS_TYPES
    assert typing.get_args(hints["rollout_correction"]) == ROLLOUT_CORRECTIONS


def test_layout_needs_world_divisible_by_model_parallel():
    cfg = load_train_config(None, ["model.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match=r"stages.base.global_batch_size=32 must be divisible by "
                                          r"optim.micro_batch_size x data parallel = 8 x 8"):
        check_layout(cfg, 16)
    assert check_layout(cfg, 4) == 2
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step=8 must be a multiple of the data parallel size 3"):
        check_layout(load_train_config(None, ["optim.micro_batch_size=1", "stages.base.global_batch_size=48",
                                              "stages.sft.global_batch_size=48"]), 3)


def test_rollout_tensor_parallel_divides_the_world():
    cfg = load_train_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel=4", "optim.micro_batch_size=4",
                                   "stages.base.global_batch_size=32"])
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel=4 must divide the world size 2 \(every rank runs "
                                          r"one rollout worker"):
        check_layout(cfg, 2)
    assert check_layout(cfg, 8) == 8
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 is for the vLLM engine"):
        load_train_config(None, ["rollout.tensor_parallel=2"])


def test_bad_value_in_file_names_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("rollout:\n  n: 1\n")
    with pytest.raises(ConfigError, match=r"train\.yaml\.rollout: n=1"):
        load_train_config(path)
