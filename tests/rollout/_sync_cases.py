"""Per-rank bodies of the TP=2 x PP=2 and TP=2 -> vLLM weight-sync tests (importable by spawned ranks).

``tp2_pp2_sync_case``: the tiny model at TP=2 x PP=2 (4 gloo ranks) takes one Adam step, then syncs into a
``RecordingEngine`` on rank 0; rank 0 also gathers every rank's shards and returns the largest difference from
``testing.reference.mcore_to_hf_state`` of them. ``vllm_tp2_sync_case``: the tiny model at TP=2 takes one Adam step
and syncs into the vLLM worker every rank runs; the engine's log-probs are compared with the Megatron RL forward.
``local_sync_case``: the same-TP sync feeds each rank's engine from its own shard, without gathers.
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


def vllm_tp2_sync_case(rank, world, model_dir, tie, rollout_tp, vision_dp=False):
    """Megatron TP=2 on 2 ranks, every rank a vLLM worker (``rollout_tp`` ranks per replica: 2 = one replica fed
    from the local shards, 1 = two replicas fed gathered tensors), started on vLLM's dummy weights. The engine's
    log-probs before any sync (mismatch ~1: a missed sync shows), then after an optimizer step and a sync (equal
    to the Megatron RL forward's)."""
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.engine import Sampling
    from megatron_tr1.rollout.vllm_engine import VLLMEngine
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.testing.tiny_model import tiny_mcore_model
    from megatron_tr1.demo import build_tiny_tokenizer

    from _cases import full_sequence, video_prompt

    init_parallel(2, 1)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    config, tokenizer = hf.config, build_tiny_tokenizer()
    model = tiny_mcore_model(hf)
    prompt = video_prompt(config, tokenizer, fps=0.5)
    video = dict(pixel_values_videos=prompt.video.pixel_values_videos, video_grid_thw=prompt.video.video_grid_thw)
    engine = VLLMEngine(config, tokenizer, model_dir, dtype=torch.float32, max_model_len=1024,
                        tensor_parallel=rollout_tp, load_format="dummy", vision_data_parallel=vision_dp)
    sampling = Sampling(temperature=0.8, max_tokens=8, seed=3)

    def mismatch():
        responses = engine.generate([prompt], 2, sampling)[0]  # the same request on every rank of a replica
        worst = 0.0
        for response in responses:
            ids, positions, labels = full_sequence(config, prompt, response.token_ids)
            with torch.no_grad():
                ours = model.forward_logprobs(ids, positions, labels, temperature=sampling.temperature, **video)
            worst = max(worst, (ours[labels != -100] - torch.tensor(response.logprobs)).abs().max().item())
        return worst, [r.token_ids for r in responses]

    before, _ = mismatch()
    # one optimizer step on the policy: raise the log-probs of a fixed continuation
    ids, positions, labels = full_sequence(config, prompt, list(range(20, 36)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.forward_logprobs(ids, positions, labels, **video)[labels != -100].sum().neg().backward()
    optimizer.step()
    stats = sync_weights(model, config, engine, dtype=torch.float32, bucket_bytes=300 * 1024)
    after, tokens = mismatch()
    every = [None] * world
    dist.all_gather_object(every, tokens)
    engine.close()
    dist.all_reduce(torch.ones(1), group=None)  # the trainer's groups survive the engine's close
    return {"stats": stats, "before": before, "after": after, "same_tokens": every[0] == every[1]}


class ShardedRecordingEngine(RecordingEngine):
    """A ``RecordingEngine`` split like the TP group (what ``local_sync`` looks for), its vision tower whole on
    every rank when ``vision_data_parallel``."""

    tensor_parallel = 2

    def __init__(self, vision_data_parallel: bool = False):
        super().__init__()
        self.vision_data_parallel = vision_data_parallel

    def vocab_range(self):
        from megatron.core import parallel_state

        r = parallel_state.get_tensor_model_parallel_rank()
        return (r * 256, (r + 1) * 256)  # the tiny vocabulary of 512 in two halves, as megatron splits it


def local_sync_case(rank, world, tie, vision_dp=False):
    """TP=2: each rank feeds its own ``ShardedRecordingEngine`` from its own shard. Returns the stats and, per
    received HF tensor, the largest difference between its part for this rank and that part of the whole model."""
    from megatron.core import parallel_state

    from megatron_tr1.convert import mapping
    from megatron_tr1.demo import tiny_hf_model
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.rollout.weight_sync import sync_weights
    from megatron_tr1.testing.reference import mcore_to_hf_state
    from megatron_tr1.testing.tiny_model import tiny_mcore_model

    init_parallel(2, 1)
    hf = tiny_hf_model(0, tie_word_embeddings=tie)
    model = tiny_mcore_model(hf)
    adam_step_on_random_gradients(model)
    engine = ShardedRecordingEngine(vision_dp)
    stats = sync_weights(model, hf.config, engine, dtype=torch.float32, bucket_bytes=300 * 1024)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if mapping.is_weight_name(k)}
    shards = [None] * world
    dist.all_gather_object(shards, ((parallel_state.get_tensor_model_parallel_rank(), 0), state))
    want = dict(mcore_to_hf_state(dict(shards), hf.config, 2, 1))
    dims = mapping.Dims.from_hf_config(hf.config)
    kinds = {n: p for p in mapping.params(dims, 0, 1) for n in p.hf}
    diffs, whole = {}, {}
    for name, got in engine.received:
        p = kinds[name]
        whole[name] = (got - want[name]).abs().max().item()  # the whole tensor (valid where it was gathered)
        # this rank's part of a full tensor: split both the same way and compare shard `rank`
        ours = mapping.split(p, [got if n == name else want[n] for n in p.hf], rank, 2)
        theirs = mapping.split(p, [want[n] for n in p.hf], rank, 2)
        diffs[name] = (ours - theirs).abs().max().item()
    return {"stats": stats, "diffs": diffs, "whole": whole, "names": sorted(n for n, _ in engine.received),
            "want": sorted(want)}
