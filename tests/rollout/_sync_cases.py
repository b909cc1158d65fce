"""Per-rank bodies of the TP=2 x PP=2 and TP=2 -> vLLM weight-sync tests (importable by spawned ranks).

``tp2_pp2_sync_case``: the tiny model at TP=2 x PP=2 (4 gloo ranks) takes one Adam step, then syncs into a
``RecordingEngine`` on rank 0; rank 0 also gathers every rank's shards and returns the largest difference from
``testing.reference.mcore_to_hf_state`` of them. ``vllm_tp2_sync_case``: the tiny model at TP=2 takes one Adam step and
syncs into a ``VLLMEngine`` that rank 0 alone holds (started inside ``VLLMEngine's own default process group``); rank 0 samples and
compares the engine's log-probs with the Megatron RL forward run by both ranks.
"""
import zlib

import torch
import torch.distributed as dist


class RecordingEngine:
    """An engine that keeps a copy of every tensor it is sent, in order, and the size of the storage behind it."""

    def __init__(self):
        self.received: list[tuple[str, torch.Tensor]] = []
        self.storage_bytes: list[int] = []

    def update_weights(self, named_tensors) -> int:
        for name, tensor in named_tensors:
            self.storage_bytes.append(tensor.untyped_storage().nbytes())
            self.received.append((name, tensor.clone()))
            del tensor
        return len(self.received)


def adam_step_on_random_gradients(model, seed: int = 0) -> None:
    """One Adam step with gradients that depend on the parameter name and TP rank only (replicated parameters
    get the same update on every TP rank, as they would from a real backward)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for name, p in model.named_parameters():
        split = getattr(p, "tensor_model_parallel", False)
        g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()) + (tp_rank if split else 0))
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    optimizer.step()


def tp2_pp2_sync_case(rank, world, tie, bucket_bytes):
    from megatron.core import parallel_state

    from megatron_tr1.convert import mapping
    from megatron_tr1.testing.reference import mcore_to_hf_state
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    init_parallel(2, 2)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    model = tiny_mcore_model(hf)
    before = {k: v.clone() for k, v in model.state_dict().items() if mapping.is_weight_name(k)}
    adam_step_on_random_gradients(model)
    engine = RecordingEngine() if rank == 0 else None
    stats = sync_weights(model, hf.config, engine, dtype=torch.float32, bucket_bytes=bucket_bytes)

    position = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if mapping.is_weight_name(k)}
    moved = max((state[k] - before[k]).abs().max().item() for k in state)
    shards = [None] * world if rank == 0 else None
    dist.gather_object((position, state), shards, dst=0)
    out = {"stats": stats, "moved": moved, "position": position}
    if rank == 0:
        want = dict(mcore_to_hf_state(dict(shards), hf.config, 2, 2))
        got = dict(engine.received)
        out.update(names=[n for n, _ in engine.received], want_names=sorted(want),
                   max_diff=max((got[n] - want[n]).abs().max().item() for n in want if n in got),
                   max_storage=max(engine.storage_bytes))
    return out


def vllm_tp2_sync_case(rank, world, model_dir, tie):
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.engine import Sampling
    from megatron_tr1.rollout.vllm_engine import VLLMEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.testing.tiny_model import tiny_mcore_model
    from megatron_tr1.demo import build_tiny_tokenizer

    from _cases import full_sequence, recomputed_logprobs, video_prompt

    init_parallel(2, 1)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    config, tokenizer = hf.config, build_tiny_tokenizer()
    model = tiny_mcore_model(hf)
    prompt = video_prompt(config, tokenizer, fps=0.5)
    video = dict(pixel_values_videos=prompt.video.pixel_values_videos, video_grid_thw=prompt.video.video_grid_thw)

    # one optimizer step on the policy: raise the log-probs of a fixed continuation
    ids, positions, labels = full_sequence(config, prompt, list(range(20, 36)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.forward_logprobs(ids, positions, labels, **video)[labels != -100].sum().neg().backward()
    optimizer.step()

    engine = None
    if rank == 0:  # started on the weights of another seed: everything the engine samples with comes from the sync
        engine = VLLMEngine(config, tokenizer, model_dir, dtype=torch.float32, max_model_len=1024)
    stats = sync_weights(model, config, engine, dtype=torch.float32, bucket_bytes=300 * 1024)

    sampling = Sampling(temperature=0.8, max_tokens=8, seed=3)
    responses = [engine.generate([prompt], 2, sampling)[0] if rank == 0 else None]
    dist.broadcast_object_list(responses, src=0)
    diffs, changes = [], []
    for response in responses[0]:
        ids, positions, labels = full_sequence(config, prompt, response.token_ids)
        with torch.no_grad():
            ours = model.forward_logprobs(ids, positions, labels, temperature=sampling.temperature, **video)
        ours = ours[labels != -100]
        engine_lp = torch.tensor(response.logprobs)
        diffs.append((ours - engine_lp).abs().max().item())
        changes.append((recomputed_logprobs(hf, prompt, response, sampling.temperature) - engine_lp).abs().max().item())
    if engine is not None:
        engine.close()
    return {"stats": stats, "max_diff": max(diffs), "step_change": max(changes)}
