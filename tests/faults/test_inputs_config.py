"""Config input faults: partial YAML sections, non-finite numbers, where override errors point, empty paths."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from megatron_tr1.config import load_config
from megatron_tr1.errors import ConfigError
from megatron_tr1.rl.config import StageConfig, TrainConfig, load_train_config


@dataclass
class Inner:
    a: int = 1
    b: float = 2.0


@dataclass
class Outer:
    # the section's default instance differs from Inner's class defaults
    inner: Inner = field(default_factory=lambda: Inner(a=10, b=20.0))
    x: float = 1.0


# ---------------------------------------------------------------- 4: a partial YAML section keeps its defaults
def test_partial_yaml_section_starts_from_the_section_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  a: 5\n")
    assert load_config(Outer, path).inner == Inner(a=5, b=20.0)
    assert load_config(Outer, path) == load_config(Outer, None, ["inner.a=5"])


def test_partial_stage_in_yaml_keeps_the_stage_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("stages:\n  sft:\n    steps: 6\n")
    from_yaml = load_train_config(path)
    assert from_yaml.stages.sft == StageConfig(steps=6, lr=3e-3, global_batch_size=32, think=False)
    assert from_yaml.stages == load_train_config(None, ["stages.sft.steps=6"]).stages
    assert from_yaml.stages.base == TrainConfig().stages.base  # untouched sections stay as they were


def test_yaml_and_overrides_merge_the_same_way(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("stages:\n  grpo:\n    episodes: 2\n    steps: 0\n")
    cfg = load_train_config(path, ["stages.grpo.lr=1e-4"])
    assert (cfg.stages.grpo.episodes, cfg.stages.grpo.steps, cfg.stages.grpo.lr) == (2.0, 0, 1e-4)
    assert cfg.stages.sft == TrainConfig().stages.sft


# ---------------------------------------------------------------- 9: non-finite numbers are refused
@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.grad_clip=inf", "algorithm.kl_coef=.nan",
                                      "optim.betas=[0.9, nan]", "stages.grpo.lr=-inf", "data.video.fps=1e999"])
def test_non_finite_override_is_a_config_error_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"override '{key}=.*'.*not a finite number"):
        load_train_config(None, [override])


def test_non_finite_yaml_value_names_file_and_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: .nan\nalgorithm:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.yaml\.optim\.lr: nan is not a finite number"):
        load_train_config(path)
    path.write_text("rollout:\n  temperature: .inf\n")
    with pytest.raises(ConfigError, match=r"train\.yaml\.rollout\.temperature: inf is not a finite number"):
        load_train_config(path)


def test_every_float_field_is_checked():
    """Generic: a toy dataclass outside the train config refuses nan too."""
    with pytest.raises(ConfigError, match=r"override 'x=nan'.*not a finite number"):
        load_config(Outer, None, ["x=nan"])
    assert math.isfinite(load_config(Outer, None, ["x=1e300"]).x)


# ---------------------------------------------------------------- 10: override errors name the override
def test_override_error_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("rollout:\n  n: 8\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(path, ["optim.lr=nan"])
    assert str(e.value).startswith("override 'optim.lr=nan'") and "tiny.yaml" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_train_config(path, ["rollout.n=1"])  # a section check (__post_init__) on an override's value
    assert str(e.value).startswith("override 'rollout.n=1'") and "n >= 2" in str(e.value)
    assert "tiny.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^override 'optim.global_batch_size=48'"):
        load_train_config(path, ["optim.global_batch_size=48"])  # a whole-config check


def test_yaml_error_still_names_the_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("rollout:\n  n: 1\n")
    with pytest.raises(ConfigError, match=r"tiny\.yaml\.rollout: n=1"):
        load_train_config(path, ["optim.lr=1e-4"])
    assert load_train_config(path, ["rollout.n=16"]).rollout.n == 16  # an override may fix the file's value


# ---------------------------------------------------------------- 10: empty paths
@pytest.mark.parametrize("key", ["data.train", "data.test", "model.hf_dir"])
def test_empty_path_says_it_is_empty(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"override '{key}='.*is empty"):
        load_train_config(None, [f"{key}="])
    path = tmp_path / "train.yaml"
    section, name = key.split(".")
    path.write_text(f"{section}:\n  {name}: ''\n")
    with pytest.raises(ConfigError, match=rf"train\.yaml\.{section}.*{name}='' is empty"):
        load_train_config(path)


def test_data_config_path_that_is_a_folder(tmp_path):
    from megatron_tr1.data.dataset import load_data_config

    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_data_config(tmp_path)
    with pytest.raises(ConfigError, match="empty"):
        load_data_config("")
