"""Grounding prompts: switching a decoded prompt to the other mode equals building it in that mode."""
import pytest
import torch

from megatron_tr1.data import synthetic
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.errors import ConfigError
from megatron_tr1.rl.config import DataSection, TrainConfig, VideoBudget
from megatron_tr1.rl.prompts import grounding_prompt, in_mode
from megatron_tr1.testing.tiny_model import tiny_hf_config
from megatron_tr1.testing.tiny_tokenizer import build_tiny_tokenizer


@pytest.mark.parametrize("think", [True, False])
def test_in_mode_equals_building_in_that_mode(tmp_path, think):
    synthetic.generate(tmp_path, 1, num_test=0, num_ood=0, size=56, progress=False)
    sample = load_samples(load_data_config(f"{tmp_path}/train.yaml")).samples[0]
    cfg, tokenizer, hf = TrainConfig(data=DataSection(video=VideoBudget(max_frames=4))), build_tiny_tokenizer(), \
        tiny_hf_config()
    direct = grounding_prompt(sample, cfg, tokenizer, hf, think)
    switched = in_mode(grounding_prompt(sample, cfg, tokenizer, hf, not think), sample.id, cfg, tokenizer, think)
    assert switched.prompt.input_ids == direct.prompt.input_ids
    assert switched.prompt.input_ids != grounding_prompt(sample, cfg, tokenizer, hf, not think).prompt.input_ids
    assert torch.equal(switched.prompt.video.pixel_values_videos, direct.prompt.video.pixel_values_videos)
    assert (switched.gt, switched.duration, switched.query) == (direct.gt, direct.duration, direct.query)
    cfg.data.max_prompt_tokens = len(direct.prompt.input_ids) - 1
    with pytest.raises(ConfigError, match=f"sample {sample.id}.*data.max_prompt_tokens"):
        in_mode(switched, sample.id, cfg, tokenizer, think)
