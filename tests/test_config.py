from dataclasses import dataclass, field

import pytest

from megatron_tr1.config import load_config, save_config
from megatron_tr1.errors import ConfigError, UserError


@dataclass
class Optim:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Train:
    name: str = "demo"
    steps: int = 10
    think: bool = True
    optim: Optim = field(default_factory=Optim)
    init: str | None = None


def test_defaults_are_the_embedded_config():
    cfg = load_config(Train)
    assert cfg == Train()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 1e-5\n")
    cfg = load_config(Train, path, ["optim.lr=3e-4", "think=false", "init=ckpt/x", "optim.betas=[0.8, 0.9]"])
    assert cfg.steps == 20
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.think is False and cfg.init == "ckpt/x" and cfg.optim.betas == [0.8, 0.9]


def test_yaml_float_written_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-6\n")  # YAML 1.1 reads this as a string
    assert load_config(Train, path).optim.lr == 1e-6


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.optim: unknown key\(s\) 'lrr'.*valid keys: betas, lr"):
        load_config(Train, path)


def test_unknown_override_names_key():
    with pytest.raises(ConfigError, match="unknown key 'optim.momentum'"):
        load_config(Train, None, ["optim.momentum=0.9"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(Train, None, ["steps"])


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"override 'steps=many': steps: expected int, got 'many'"):
        load_config(Train, None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"expected int, got True"):
        load_config(Train, None, ["steps=true"])


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Train, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Train, bad)
    assert issubclass(ConfigError, UserError)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(Train, None, ["steps=7", "optim.lr=0.5"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Train, tmp_path / "out.yaml") == cfg
