"""Grounding prompts: the cache decodes a video once, its other prompts equal building them directly, and it
stays within its memory bound."""
import dataclasses

import pytest
import torch

from megatron_tr1.data import synthetic
from megatron_tr1.data.dataset import load_data_config, load_samples
from megatron_tr1.errors import ConfigError
from megatron_tr1.data import prompt_cache as prompts_module
from megatron_tr1.data.prompt_cache import PromptCache
from megatron_tr1.data.video import VideoBudget
from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_config
from megatron_tr1.rl.config import TrainConfig
from megatron_tr1.rl.prompts import grounding_item, grounding_prompt

VIDEO = VideoBudget(max_frames=4)
SAMPLE_PROMPT = prompts_module.sample_prompt  # the real one (the ``decodes`` fixture wraps it)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 3, num_test=0, num_ood=0, size=56, progress=False)
    return load_samples(load_data_config(f"{out}/train.yaml")).samples


@pytest.fixture
def decodes(monkeypatch):
    """The videos ``sample_prompt`` decodes, in order."""
    calls, real = [], prompts_module.sample_prompt
    monkeypatch.setattr(prompts_module, "sample_prompt", lambda *a: calls.append(a[0].video) or real(*a))
    return calls


def direct(sample, think):
    return SAMPLE_PROMPT(sample, build_tiny_tokenizer(), tiny_hf_config(), VIDEO, think)


@pytest.mark.parametrize("think", [True, False])
def test_cache_decodes_a_video_once_and_its_other_prompts_equal_building_them_directly(samples, decodes, think):
    cache = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO)
    first = cache(samples[:1], not think)[0]
    # the other mode, and another query on the same video (as Charades-STA has), reuse its frames
    other_query = dataclasses.replace(samples[0], query="the blue square moves", id="other")
    got = cache([samples[0], other_query, samples[1]], think)
    assert decodes == [samples[0].video, samples[1].video] and cache.decodes == 2
    assert got[0].video is first.video and got[1].video is first.video
    for prompt, sample in zip(got, [samples[0], other_query, samples[1]]):
        assert prompt.input_ids == direct(sample, think).input_ids
    assert got[0].input_ids != first.input_ids != got[1].input_ids
    assert torch.equal(got[1].video.pixel_values_videos, direct(other_query, think).video.pixel_values_videos)
    assert cache([samples[0]], think)[0] is got[0]  # kept, not rebuilt


def test_cache_keeps_clips_of_one_video_apart_and_rebuilds_them_from_their_key(samples, decodes):
    cache = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO)
    clip = dataclasses.replace(samples[0], clip=(0.5, 2.5), id="clip")
    whole, cut = cache([samples[0], clip], True)
    assert decodes == [samples[0].video, samples[0].video] and cache.decodes == 2  # two entries
    assert cut.frames.timestamps.min() >= 0.5 and cut.frames.timestamps.max() <= 2.5
    assert whole.frames.timestamps.max() > 2.5
    assert cut.key[-1] == (0.5, 2.5) and whole.key[-1] is None
    assert cache.from_key(cut.key) is cut and cache.from_key(whole.key) is whole  # what another rank builds
    fresh = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO)
    assert torch.equal(fresh.from_key(cut.key).frames.indices, cut.frames.indices)
    bad = dataclasses.replace(samples[0], clip=(9.0, 9.5), id="past the end")
    assert fresh.prompts_or_skip([bad, samples[0]], True)[0] is None  # a bad clip skips that clip only
    assert fresh.skipped == {"clip too short": 1} and fresh.prompts_or_skip([samples[0]], True)[0] is not None


def test_cache_evicts_the_least_recently_used_video_beyond_its_bound(samples, decodes):
    size = prompts_module._nbytes(direct(samples[0], True))
    cache = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO, max_gb=2.5 * size / 2**30)
    cache(samples[:2], True)
    cache(samples[:1], False)  # touches video 0: video 1 is now the least recently used
    cache(samples[2:], True)  # a third does not fit: video 1 goes
    assert cache.nbytes == 2 * size <= cache.max_bytes
    cache(samples[:1], True)
    assert decodes == [s.video for s in samples]  # video 0 was kept
    cache(samples[1:2], True)
    assert decodes[-1] == samples[1].video and cache.decodes == 4
    small = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO, max_gb=1.5 * size / 2**30)
    small(samples[:1], True)
    small.max_bytes = size - 1  # a video larger than the bound is not kept, and evicts nothing
    small(samples[1:2], True)
    assert list(small._videos) == [str(samples[0].video)] and small.nbytes == size
    none = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO, max_gb=0)
    assert none(samples[:1], True)[0].input_ids == direct(samples[0], True).input_ids and none.nbytes == 0


def test_prompt_longer_than_the_limit_names_the_sample_and_field(samples):
    cfg = TrainConfig()
    cfg.data.video = VIDEO
    item = grounding_prompt(samples[0], cfg, build_tiny_tokenizer(), tiny_hf_config(), think=True)
    assert (item.gt, item.duration, item.query) == (samples[0].gt, samples[0].duration, samples[0].query)
    limit = len(item.prompt.input_ids) - 1
    with pytest.raises(ConfigError, match=f"sample {samples[0].id}.*data.max_prompt_tokens={limit}"):
        grounding_item(samples[0], item.prompt, limit)


def test_eval_predictor_takes_prompts_from_the_cache_a_batch_at_a_time(samples, decodes):
    from megatron_tr1.eval.model_predictor import EnginePredictor

    seen = []

    class Engine:
        def generate(self, prompts, n, sampling):
            seen.append([p.input_ids for p in prompts])
            return [[type("R", (), {"text": f"answer {len(seen)}"})()] for _ in prompts]

    cache = PromptCache(build_tiny_tokenizer(), tiny_hf_config(), VIDEO)
    cache(samples[:1], True)
    texts = EnginePredictor(Engine(), cache, think=False, batch_size=2, progress=False).predict(samples)
    assert texts == ["answer 1", "answer 1", "answer 2"]
    assert seen == [[direct(s, False).input_ids for s in samples[:2]], [direct(samples[2], False).input_ids]]
    assert decodes == [s.video for s in samples]  # the think prompt's frames were reused


def test_training_prompt_uses_the_problem_verbatim_and_evaluation_modes_the_lmms_eval_text(samples):
    from megatron_tr1.data.prompt import eval_text

    tok = build_tiny_tokenizer()
    extra = dataclasses.replace(samples[0], problem=f'Give the query: "{samples[0].query}", when does the described '
                                                    "content occur in the video?. Answer in whole seconds.")
    cache = PromptCache(tok, tiny_hf_config(), VIDEO)
    train, custom, r1 = (tok.decode(cache.get(extra, mode).input_ids) for mode in (True, "custom", "r1"))
    assert "Answer in whole seconds." in train
    assert "Answer in whole seconds." not in custom and eval_text(samples[0].query) in custom
    assert "You are a helpful assistant." in custom and "You FIRST think" in r1 and eval_text(samples[0].query) in r1
    # another rank rebuilds each from its key alone (rollout.placement)
    for mode in (True, "custom"):
        prompt = cache.get(extra, mode)
        other = PromptCache(tok, tiny_hf_config(), VIDEO)
        assert other.from_key(prompt.key).input_ids == prompt.input_ids
