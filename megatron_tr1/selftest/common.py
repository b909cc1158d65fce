"""What the checks share: the tiny model as a megatron-core model on a backend, trainer-side inputs of a response,
HF log-probs of a response, random video frames, an HF model folder for vLLM, the bf16 tolerance rule.

**bf16 tolerance.** A bf16 result is compared with the fp32 HF truth, and judged against the error HF
transformers itself makes in bf16 on the same input: ``BF16_FACTOR`` x that error (+ a small floor). Two bf16
implementations of the same maths round differently but by the same order, so a correct path lands well inside,
and a wrong weight, position or mask lands far outside.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_tr1.backend import Backend, resolve

FP32_RTOL = 1e-5  # logits vs HF, relative to max |HF logit| (tests/models: measured <= 2e-6)
LOGPROB_ATOL_FP32 = 1e-4  # engine vs trainer log-probs after a sync (tests/rollout: measured ~5e-7)
BF16_FACTOR = 4.0
VIDEO_SHAPE = (4, 3, 32, 48)  # frames for the tiny model's 4x4 patches: grid (2, 8, 12), 48 visual tokens


def check_backend(dtype: str, layer_spec: str = "local") -> Backend:
    """The backend of a check: this machine's device with ``dtype`` ("fp32" | "bf16") and ``layer_spec``. fp32
    on a GPU is IEEE fp32 (TF32 off), so it can be held to the fp32 tolerances."""
    backend = resolve(layer_spec, dtype)
    if backend.cuda and dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return backend


def init_one_rank(backend: Backend, tp: int = 1) -> None:
    """Megatron parallel state for this rank (TP=tp, PP=1) on ``backend``."""
    from megatron_tr1.distributed import init_parallel

    init_parallel(tp, 1, backend=backend)


def mcore_model(hf, backend: Backend):
    """This rank's megatron-core ``Qwen2_5_VLModel`` holding ``hf``'s weights (through ``convert.weights``) in
    ``backend``'s dtype and layer spec, on its device, in eval mode. Parallel state must be initialised."""
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    model = Qwen2_5_VLModel(hf.config, layer_spec=backend.layer_spec, params_dtype=backend.dtype,
                            cpu_init=not backend.cuda).to(backend.device)
    load_weights(model, hf.state_dict(), hf.config)
    return model.eval()


def rope_positions(config, batch: dict) -> torch.Tensor:
    from megatron_tr1.models.qwen2_5_vl import get_rope_index

    return get_rope_index(config, batch["input_ids"], batch.get("attention_mask"),
                          video_grid_thw=batch.get("video_grid_thw"),
                          second_per_grid_ts=batch.get("second_per_grid_ts"))


def hf_logits(hf, batch: dict, position_ids: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """HF logits (float32, on the CPU) for ``batch`` at ``get_rope_index``'s positions."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "pixel_values_videos", "video_grid_thw") if k in batch}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    with torch.no_grad():
        return hf(**inputs, position_ids=position_ids.to(device)).logits.float().cpu()


def random_frames(seed: int = 0, fps: float = 2.0):
    """Random uint8 frames as ``data.video.sample_frames`` returns them (sampled at ``fps``)."""
    from megatron_tr1.data.video import VideoFrames

    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, VIDEO_SHAPE, dtype=torch.uint8, generator=g)
    t = VIDEO_SHAPE[0]
    return VideoFrames(frames=frames, timestamps=torch.arange(t, dtype=torch.float64) / fps,
                       indices=torch.arange(t), sample_fps=fps, duration=t / fps, total_frames=t, video_fps=fps)


def video_prompt(config, tokenizer, seed: int = 0, fps: float = 2.0):
    from megatron_tr1.data.prompt import build_prompt

    return build_prompt(tokenizer, config, "a person opens the door", random_frames(seed, fps))


def trainer_inputs(config, prompt, response_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the trainer feeds for prompt + response, built by the trainer's own ``rl.prompts.model_batch``: ids
    ``[1, L]``, M-RoPE positions ``[3, 1, L]`` and labels ``[1, L]`` (-100 where nothing is predicted)."""
    from megatron_tr1.rl.batching import TokenSequence
    from megatron_tr1.rl.prompts import model_batch

    batch = model_batch([TokenSequence(list(prompt.input_ids), list(response_ids))], [prompt], config)
    return batch["input_ids"], batch["position_ids"], batch["labels"]


def trainer_logprobs(model, config, prompt, response_ids, temperature: float, backend: Backend) -> torch.Tensor:
    """The megatron model's RL log-probs (``forward_logprobs``) of ``response_ids``, float32 on the CPU."""
    ids, positions, labels = trainer_inputs(config, prompt, response_ids)
    dev = backend.device
    with torch.no_grad():
        lp = model.forward_logprobs(ids.to(dev), positions.to(dev), labels.to(dev), temperature=temperature,
                                    pixel_values_videos=prompt.video.pixel_values_videos.to(dev, backend.dtype),
                                    video_grid_thw=prompt.video.video_grid_thw.to(dev))
    return lp[labels.to(dev) != -100].float().cpu()


def hf_logprobs(hf, prompt, response_ids, temperature: float, device, dtype: torch.dtype) -> torch.Tensor:
    """log-probs of ``response_ids`` from an HF model's full forward at the trainer's positions (float32, CPU)."""
    ids, positions, labels = trainer_inputs(hf.config, prompt, response_ids)
    batch = dict(input_ids=ids, pixel_values_videos=prompt.video.pixel_values_videos,
                 video_grid_thw=prompt.video.video_grid_thw)
    logits = hf_logits(hf, batch, positions, device, dtype)[0, labels[0] != -100]
    lp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return lp.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0]


def bf16_twin(hf, device):
    """A bf16 copy of the fp32 HF model ``hf`` on ``device`` (the reference for bf16 tolerances)."""
    import copy

    return copy.deepcopy(hf).to(device=device, dtype=torch.bfloat16).eval()


def bf16_tolerance(reference_error: float, floor: float) -> float:
    return BF16_FACTOR * reference_error + floor


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@dataclasses.dataclass
class Timer:
    """Median wall time of a callable on the backend (synchronised), for the GPU timing checks."""

    backend: Backend

    def median_ms(self, fn, repeats: int) -> float:
        import statistics
        import time

        times = []
        for _ in range(repeats):
            self.backend.synchronize()
            start = time.perf_counter()
            fn()
            self.backend.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
