"""Shared inputs of the rollout tests, and the per-rank body of the TP=2 weight-sync test (importable by ranks).

``sync_case``: the tiny model at TP=2 takes one Adam step on a video batch, then its weights are synced into an
``HFEngine`` on rank 0 that still holds the pre-step weights; rank 0 samples a response to a video prompt, and
both ranks recompute its log-probs with the Megatron RL forward (``get_rope_index`` positions of prompt +
response, as the trainer does).
"""

import torch
import torch.distributed as dist

from megatron_tr1.data.video import VideoFrames
from megatron_tr1.data.prompt import build_prompt
from megatron_tr1.rollout.engine import Sampling, stop_token_id

VIDEO_SHAPE = (4, 3, 32, 48)  # frames of the tiny model's 4x4 patches: grid (2, 8, 12), 48 visual tokens


def tiny_frames(seed: int = 0, fps: float = 2.0) -> VideoFrames:
    """Random uint8 frames as ``data.video.sample_frames`` returns them (sampled at ``fps``)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, VIDEO_SHAPE, dtype=torch.uint8, generator=g)
    t = VIDEO_SHAPE[0]
    return VideoFrames(frames=frames, timestamps=torch.arange(t, dtype=torch.float64) / fps,
                       indices=torch.arange(t), sample_fps=fps, duration=t / fps, total_frames=t, video_fps=fps)


def video_prompt(config, tokenizer, query: str = "a person opens the door", seed: int = 0, fps: float = 2.0):
    return build_prompt(tokenizer, config, query, tiny_frames(seed, fps))


def stop_case(engine, hf, tokenizer, push):
    """Swap the LM-head rows of greedy decoding's second token and <|im_end|>, load the head with ``push(head)``,
    and return ``(response, first_token, stop_id)`` of a new greedy generation, which must end at <|im_end|>."""
    greedy = Sampling(temperature=0, max_tokens=5)
    stop = stop_token_id(tokenizer)
    for seed in range(8):  # a video whose greedy reply starts with two distinct non-stop tokens
        prompt = video_prompt(hf.config, tokenizer, seed=seed)
        a, b = engine.generate([prompt], 1, greedy)[0][0].token_ids[:2]
        if len({a, b, stop}) == 3:
            break
    assert len({a, b, stop}) == 3, "no test video gave two distinct first tokens"
    head = hf.lm_head.weight.detach().clone()
    head[[b, stop]] = head[[stop, b]]
    push(head)
    return engine.generate([prompt], 1, greedy)[0][0], a, stop


def write_model_dir(hf, path) -> str:
    """An HF model directory of ``hf`` for vLLM (``demo.write_tiny_model_dir``)."""
    from megatron_tr1.demo import write_tiny_model_dir

    return write_tiny_model_dir(hf, path)


def full_sequence(config, prompt, response_ids):
    """Trainer-side inputs for prompt + response: ids ``[1, L]``, positions ``[3, 1, L]``, labels ``[1, L]``."""
    from megatron_tr1.models.positions import get_rope_index

    ids = torch.tensor([prompt.input_ids + list(response_ids)])
    positions = get_rope_index(config, ids, video_grid_thw=prompt.video.video_grid_thw,
                               second_per_grid_ts=torch.tensor([prompt.video.second_per_grid_ts]))
    labels = torch.full_like(ids, -100)
    start = len(prompt.input_ids)
    labels[0, start - 1:-1] = ids[0, start:]
    return ids, positions, labels


def recomputed_logprobs(hf, prompt, response, temperature):
    """log-probs of ``response``'s tokens from the HF model's full forward at the trainer's positions."""
    ids, positions, labels = full_sequence(hf.config, prompt, response.token_ids)
    with torch.no_grad():
        logits = hf(input_ids=ids, position_ids=positions, pixel_values_videos=prompt.video.pixel_values_videos,
                    video_grid_thw=prompt.video.video_grid_thw).logits[0, labels[0] != -100]
    lp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return lp.gather(-1, torch.tensor(response.token_ids)[:, None])[:, 0]


def sync_case(rank, world, tie, bucket_bytes):
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.engine import Sampling
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.testing.tiny_model import tiny_mcore_model
    from megatron_tr1.demo import build_tiny_tokenizer

    init_parallel(2, 1)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    config, tokenizer = hf.config, build_tiny_tokenizer()
    model = tiny_mcore_model(hf)
    prompt = video_prompt(config, tokenizer)
    video = dict(pixel_values_videos=prompt.video.pixel_values_videos, video_grid_thw=prompt.video.video_grid_thw)

    # one optimizer step on the policy: raise the log-probs of a fixed continuation
    ids, positions, labels = full_sequence(config, prompt, list(range(20, 36)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.forward_logprobs(ids, positions, labels, **video)[labels != -100].sum().neg().backward()
    optimizer.step()

    engine = HFEngine(config, tokenizer) if rank == 0 else None
    if engine is not None:
        engine.model.load_state_dict(hf.state_dict())  # the pre-step policy
    stats = sync_weights(model, config, engine, dtype=torch.float32, bucket_bytes=bucket_bytes)

    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=12, seed=3)
    response = [engine.generate([prompt], 1, sampling)[0][0] if rank == 0 else None]
    dist.broadcast_object_list(response, src=0)
    response = response[0]
    ids, positions, labels = full_sequence(config, prompt, response.token_ids)
    with torch.no_grad():
        ours = model.forward_logprobs(ids, positions, labels, temperature=sampling.temperature, **video)
    ours = ours[labels != -100]
    out = {"stats": stats}
    if rank == 0:
        engine_lp = torch.tensor(response.logprobs)
        out["max_diff"] = (ours - engine_lp).abs().max().item()
        before = recomputed_logprobs(hf, prompt, response, sampling.temperature)  # the pre-step policy
        out["step_change"] = (before - engine_lp).abs().max().item()
    return out


def pp_sync_case(rank, world, tie, bucket_bytes=300 * 1024):
    """TP=1 x PP=2: sync into an engine holding other weights; rank 0 returns the largest difference between
    the engine's weights and the policy's (the last stage's layers and norm arrive by PP broadcast)."""
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.hf_engine import HFEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.testing.tiny_model import tiny_mcore_model
    from megatron_tr1.demo import build_tiny_tokenizer

    init_parallel(1, 2)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    model = tiny_mcore_model(hf)
    engine = HFEngine(hf.config, build_tiny_tokenizer()) if rank == 0 else None
    stats = sync_weights(model, hf.config, engine, dtype=torch.float32, bucket_bytes=bucket_bytes)
    if engine is None:
        return None
    ours, ref = engine.model.state_dict(), hf.state_dict()
    assert ours.keys() == ref.keys()
    return stats, max((ours[k] - ref[k]).abs().max().item() for k in ref)
