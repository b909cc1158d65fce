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


def test_eval_predictor_of_the_other_mode_reuses_the_decoded_frames(tmp_path, monkeypatch):
    from megatron_tr1.eval import model_predictor
    from megatron_tr1.eval.model_predictor import EnginePredictor

    synthetic.generate(tmp_path, 2, num_test=0, num_ood=0, size=56, progress=False)
    samples = load_samples(load_data_config(f"{tmp_path}/train.yaml")).samples
    tokenizer, hf, video = build_tiny_tokenizer(), tiny_hf_config(), VideoBudget(max_frames=4)
    think = EnginePredictor(None, tokenizer, hf, video, think=True)
    direct = EnginePredictor(None, tokenizer, hf, video, think=False).prompts(samples)
    decoded = think.prompts(samples[:1])
    calls = []
    real = model_predictor.sample_prompt
    monkeypatch.setattr(model_predictor, "sample_prompt", lambda *a: calls.append(a[0].id) or real(*a))
    reused = EnginePredictor(None, tokenizer, hf, video, think=False, frames_from=think).prompts(samples)
    assert calls == [samples[1].id]  # only the sample the think predictor had not decoded
    assert [p.input_ids for p in reused] == [p.input_ids for p in direct] != [decoded[0].input_ids] * 2
    assert reused[0].video is decoded[0].video
    assert torch.equal(reused[1].video.pixel_values_videos, direct[1].video.pixel_values_videos)
