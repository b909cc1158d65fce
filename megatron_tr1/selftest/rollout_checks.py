"""Rollout engines after a weight sync: the engine's sampled-token log-probs against the trainer's recomputation.

The trainer is the megatron-core model holding the tiny random HF model's weights; the engine starts on other
weights (random init for HF, another seed's folder for vLLM), so everything it samples with arrives through
``rollout.weight_sync.sync_weights`` (300 KiB buckets: many of them). It samples two responses to a video prompt
(temperature 0.8); the trainer recomputes their log-probs with its RL forward (``forward_logprobs``) at the
M-RoPE positions of prompt + response, as a GRPO step does (``logprob_mismatch``).

- ``hf_engine_after_sync`` fp32: max |engine - trainer| <= 1e-4 (tests/rollout; measured ~5e-7).
- bf16 (GPU): compared under the bf16 rule (``common``): <= 4 x the error of HF's own bf16 full forward against
  its fp32 one on the same tokens, + 1e-3.
- ``vllm_engine`` (GPU + vLLM, bf16, layer spec auto): greedy generation, ``sleep`` (must free GPU memory) and
  ``wake_up`` (must give the same greedy tokens), then the weight sync and the log-prob comparison above. It runs
  in a rank process of its own, which ends with the engine (see the note at ``engine.close``).
"""
from __future__ import annotations

import tempfile

import torch

from megatron_tr1.selftest import common
from megatron_tr1.selftest.registry import Measured

TEMPERATURE = 0.8
BUCKET_BYTES = 300 * 1024


def _setup(backend):
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_hf_model

    common.init_one_rank(backend)
    hf = tiny_hf_model(0)
    tokenizer = build_tiny_tokenizer()
    model = common.mcore_model(hf, backend)
    return hf, tokenizer, model, common.video_prompt(hf.config, tokenizer)


def _sampling():
    from megatron_tr1.rollout.engine import Sampling

    return Sampling(temperature=TEMPERATURE, max_tokens=12, seed=3)


def _compare(hf, model, prompt, responses, backend) -> tuple[Measured | None, dict]:
    """Engine vs trainer log-probs of ``responses``: (verdict, numbers). fp32: the fixed tolerance; bf16: the
    bf16 rule against HF bf16 vs HF fp32 on the same tokens."""
    diffs, ref_errors, tokens = [], [], 0
    twin = common.bf16_twin(hf, backend.device) if backend.dtype == torch.bfloat16 else None
    if twin is not None:
        hf = hf.to(backend.device)
    for r in responses:
        ours = common.trainer_logprobs(model, hf.config, prompt, r.token_ids, TEMPERATURE, backend)
        diffs.append(common.max_abs(ours, torch.tensor(r.logprobs)))
        tokens += len(r.token_ids)
        if twin is not None:
            exact = common.hf_logprobs(hf, prompt, r.token_ids, TEMPERATURE, backend.device, torch.float32)
            rounded = common.hf_logprobs(twin, prompt, r.token_ids, TEMPERATURE, backend.device, torch.bfloat16)
            ref_errors.append(common.max_abs(rounded, exact))
    mismatch = max(diffs)
    numbers = {"logprob_mismatch_max": mismatch, "responses": len(responses), "tokens": tokens}
    if twin is None:
        tol, rule = common.LOGPROB_ATOL_FP32, f"<= {common.LOGPROB_ATOL_FP32:g}"
    else:
        ref = max(ref_errors)
        tol = common.bf16_tolerance(ref, 1e-3)
        numbers["hf_bf16_logprob_err"] = ref
        rule = f"<= {common.BF16_FACTOR:g} x HF bf16 error ({ref:.1e}) + 1e-3 = {tol:.1e}"
    numbers["tolerance"] = tol
    return Measured(mismatch, rule, mismatch <= tol and tokens > 0, numbers), numbers


def hf_engine_after_sync(dtype: str = "fp32") -> Measured:
    from megatron_tr1.rollout.factory import make_engine
    from megatron_tr1.rollout.weight_sync import sync_weights

    backend = common.check_backend(dtype)
    hf, tokenizer, model, prompt = _setup(backend)
    engine = make_engine("hf", hf.config, tokenizer, backend)  # random weights: the sync must bring them all
    stats = sync_weights(model, hf.config, engine, dtype=backend.dtype, bucket_bytes=BUCKET_BYTES)
    responses = engine.generate([prompt], 2, _sampling())[0]
    verdict, numbers = _compare(hf, model, prompt, responses, backend)
    numbers.update(sync_tensors=stats.tensors, sync_buckets=stats.buckets, sync_seconds=stats.seconds)
    return verdict


def vllm_engine() -> Measured:
    from megatron_tr1.demo import tiny_hf_model, write_tiny_model_dir
    from megatron_tr1.rollout.engine import Sampling
    from megatron_tr1.rollout.factory import make_engine
    from megatron_tr1.rollout.weight_sync import sync_weights

    backend = common.check_backend("bf16", "auto")
    hf, tokenizer, model, prompt = _setup(backend)
    greedy = Sampling(temperature=0, max_tokens=6)
    with tempfile.TemporaryDirectory(prefix="tr1-selftest-vllm-") as tmp:
        model_dir = write_tiny_model_dir(tiny_hf_model(1), tmp)  # other weights than the trainer's
        torch.cuda.empty_cache()
        engine = make_engine("vllm", hf.config, tokenizer, backend, model_dir=model_dir, max_model_len=1024,
                             gpu_memory_utilization=0.25, enforce_eager=True)
        first = engine.generate([prompt], 1, greedy)[0][0].token_ids
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        freed = (torch.cuda.mem_get_info()[0] - free_awake) / 2 ** 30
        engine.wake_up()
        again = engine.generate([prompt], 1, greedy)[0][0].token_ids
        stats = sync_weights(model, hf.config, engine, dtype=backend.dtype, bucket_bytes=BUCKET_BYTES)
        responses = engine.generate([prompt], 2, _sampling())[0]
        verdict, numbers = _compare(hf, model, prompt, responses, backend)
    # no engine.close(): it runs vLLM's teardown, which unregisters every process group of this process (the
    # trainer's too); this check has a rank process of its own, whose exit frees the engine (registry: "own")
    numbers.update(sleep_freed_gib=freed, greedy_same_after_wake_up=first == again, sync_tensors=stats.tensors,
                   sync_buckets=stats.buckets, layer_spec=backend.layer_spec)
    problems = ([] if freed > 0 else ["sleep freed nothing"]) + \
        ([] if first == again else ["greedy tokens changed across sleep / wake_up"])
    return Measured(f"{verdict.value:.2e}; sleep freed {freed:.1f} GiB" + "".join(f"; {p}" for p in problems),
                    verdict.tolerance + "; sleep frees memory; same greedy after wake_up",
                    verdict.passed and not problems, numbers)
