"""Per-rank body of the Qwen3-VL engine tests: the tiny Qwen3-VL as a Megatron model, its weights synced into an
engine started on other weights; the engine's log-probs on a timestamped video prompt against the Megatron RL
forward's, before the sync (far off) and after an optimizer step and the sync (equal)."""
import torch


def engine_sync_case(rank, world, engine_kind, model_dir, tie):
    from megatron_tr1.demo import build_tiny_tokenizer, tiny_qwen3_vl_model
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.engine import Sampling
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.testing.tiny_qwen3_vl import tiny_mcore_qwen3_vl

    from _cases import full_sequence, video_prompt

    init_parallel(1, 1)
    hf = tiny_qwen3_vl_model(0, tie_word_embeddings=tie)
    config, tokenizer = hf.config, build_tiny_tokenizer(family="qwen3_vl")
    model = tiny_mcore_qwen3_vl(hf)
    prompt = video_prompt(config, tokenizer, fps=0.5)
    assert "seconds>" in tokenizer.decode(prompt.input_ids)  # the timestamped Qwen3-VL prompt
    video = dict(pixel_values_videos=prompt.video.pixel_values_videos, video_grid_thw=prompt.video.video_grid_thw)
    if engine_kind == "hf":
        from megatron_tr1.rollout.hf_engine import HFEngine

        torch.manual_seed(1)  # other random weights than the policy's
        engine = HFEngine(config, tokenizer)
    else:
        from megatron_tr1.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(config, tokenizer, model_dir, dtype=torch.float32, max_model_len=1024,
                            load_format="dummy")
    sampling = Sampling(temperature=0.8, max_tokens=8, seed=3)

    def mismatch():
        worst = 0.0
        for response in engine.generate([prompt], 2, sampling)[0]:
            ids, positions, labels = full_sequence(config, prompt, response.token_ids)
            with torch.no_grad():
                ours = model.forward_logprobs(ids, positions, labels, temperature=sampling.temperature, **video)
            worst = max(worst, (ours[labels != -100] - torch.tensor(response.logprobs)).abs().max().item())
        return worst

    before = mismatch()
    ids, positions, labels = full_sequence(config, prompt, list(range(20, 36)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.forward_logprobs(ids, positions, labels, **video)[labels != -100].sum().neg().backward()
    optimizer.step()
    stats = sync_weights(model, config, engine, dtype=torch.float32, bucket_bytes=300 * 1024)
    after = mismatch()
    if hasattr(engine, "close"):
        engine.close()
    return {"before": before, "after": after, "tensors": stats.tensors}
