"""``tr1 verify``: the Megatron model on a tr1 checkpoint and the HF model give the same logits.

Starts TP x PP worker processes (``launch.run_ranks``: gloo on CPU, NCCL on GPU, as ``backend.resolve`` says),
each loading its shard through ``convert.weights.load_weights`` (so a checkpoint stored at another layout or
in the other spelling loads alike) and running the Megatron model (``models.build_model``) forward
on one text + video batch; pipeline stages hand hidden states on with point-to-point sends. The HF model
runs the same batch in this process, given the M-RoPE positions of our ``get_rope_index`` (which the workers
compute for themselves), so Megatron's M-RoPE is checked at the positions training uses. HF's own positions
differ from those after a video whose temporal ids run past its spatial ones (``rope_index`` docstring), as
the first video's here do. The batch is synthetic and seeded: random token ids around one random video per
row, patchified by the training pipeline's ``data.processor``.

**Criterion.** In float32: max|Megatron - HF| <= ``--rtol`` x max|HF logit| (default 1e-4). In bfloat16 a fixed
tolerance does not work, as rounding noise grows with depth: on the Qwen2.5-VL-3B architecture with random weights
(CPU) HF bf16 alone is 0.33 from HF fp32 at max|logit| 5.2, and Megatron bf16 0.43 from HF bf16, which the former
5e-2 x max|logit| failed. So a bfloat16 verify runs HF twice, in float32 (the reference) and in bfloat16 (the noise
floor), and passes when the max and the RMS of |Megatron bf16 - HF fp32| are each within ``--noise-factor``
(default 2) x those of |HF bf16 - HF fp32|, + 1e-4 x max|logit| (so a zero noise floor cannot fail). The max
catches a few wrong logits, the RMS is the steadier measure of the whole. Measured ratios (max / RMS): correct
conversions 0.7-1.3 / 0.8-1.1 on deep tiny models, 0.99 / 1.00-1.03 at 3B (TP2, TP1 x PP2); two heads swapped in
layer 0 of 36, 14 / 6.4 at 3B (FAIL). An error below bf16's own noise passes: the same swap in layer 18 gave
1.02 / 1.07 at 3B. So a float32 verify checks the weights (it failed every broken checkpoint tried on the deep
tiny model by 20x its tolerance or more) and a bfloat16 one the bf16 path. ``--rtol`` with bfloat16 replaces the
noise test by the fixed tolerance. The last line printed is ``max_abs_logit_diff=<value>``
(Megatron vs HF float32); the exit status is 1 on FAIL.

**Memory.** The Megatron workers (each its shard, in ``--dtype``) exit before HF loads. HF loads once, in float32,
on the host and then on the device: 4 bytes a parameter, twice a bf16 load. For Qwen2.5-VL-3B's 3.75 B parameters
that is 15 GB of model, measured on CPU at a resident peak of 16 to 20 GB while loading (the rest is the
memory-mapped checkpoint). A bfloat16 verify then casts the parameters in place to bfloat16 for its second
forward: never two copies (and the same logits as a model loaded in bfloat16).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from megatron_tr1.convert.checkpoint import HF_SUBDIR, read_meta
from megatron_tr1.errors import ConfigError
from megatron_tr1.models.family import require_supported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_RTOL = 1e-4  # float32: tolerance relative to max|HF logit|; also the absolute floor of the noise test
DEFAULT_NOISE_FACTOR = 2.0  # low precision: |Megatron - HF fp32| <= this x |HF low - HF fp32| (max and RMS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint (save_pretrained directory)")
    parser.add_argument("--mcore-dir", required=True, help="tr1 Megatron checkpoint (`tr1 convert hf-to-mcore`)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the stored one)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the stored one)")
    parser.add_argument("--spec", choices=("auto", "local", "te"), default="auto",
                        help="Megatron layer spec (auto: te on a GPU with transformer-engine, else local)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype of both models")
    parser.add_argument("--rtol", type=float, default=None,
                        help=f"tolerance relative to max|HF fp32 logit| (float32 default {DEFAULT_RTOL:g}); with "
                             "--dtype bfloat16 it replaces the noise-floor test")
    parser.add_argument("--noise-factor", type=float, default=DEFAULT_NOISE_FACTOR,
                        help="bfloat16: pass when max and RMS of |Megatron - HF fp32| are within this factor of "
                             f"|HF bf16 - HF fp32| (default {DEFAULT_NOISE_FACTOR:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")


def synthetic_batch(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows ``text, <vision_start>, video pads, <vision_end>, text``, each with its own random 4-frame
    video of 4 x 6 merged patches per frame (0.5 and 4 fps), through ``data.processor.preprocess_video``."""
    from megatron_tr1.data.processor import preprocess_video

    g = torch.Generator().manual_seed(seed)
    vc, vocab = config.vision_config, config.text_config.vocab_size
    side = vc.patch_size * vc.spatial_merge_size
    special = torch.tensor([config.image_token_id, config.video_token_id, config.vision_start_token_id,
                            config.vision_end_token_id])
    rows, videos = [], []
    for fps in (0.5, 4.0):
        frames = torch.randint(0, 256, (4, 3, 4 * side, 6 * side), generator=g, dtype=torch.uint8)
        video = preprocess_video(frames, fps, patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                                 merge_size=vc.spatial_merge_size)
        text = torch.randint(0, vocab, (16,), generator=g)
        while (bad := torch.isin(text, special)).any():  # plain text only
            text[bad] = torch.randint(0, vocab, (int(bad.sum()),), generator=g)
        pads = [config.vision_start_token_id] + [config.video_token_id] * video.num_video_tokens + \
            [config.vision_end_token_id]
        rows.append(torch.cat([text[:6], torch.tensor(pads), text[6:]]))
        videos.append(video)
    input_ids = torch.stack(rows)
    return dict(input_ids=input_ids,
                pixel_values_videos=torch.cat([v.pixel_values_videos for v in videos]),
                video_grid_thw=torch.cat([v.video_grid_thw for v in videos]),
                second_per_grid_ts=torch.tensor([v.second_per_grid_ts for v in videos]))


def _pipeline_hop(tensor: torch.Tensor | None, shape, dtype, device, send: bool) -> torch.Tensor | None:
    """Send ``tensor`` to the next pipeline stage, or receive one of ``shape`` from the previous stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if send:
        dist.send(tensor.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, ps.get_pipeline_model_parallel_prev_rank())
    return buf


def megatron_logits(rank: int, world: int, mcore_dir: str, tp: int, pp: int, spec: str, dtype: str, batch: dict):
    """One rank's part of the Megatron forward; the logits ``[b, s, v]`` (numpy) from TP rank 0 of the last
    stage, None elsewhere. The model computes in ``dtype`` on the backend's device (bf16 on CPU too: verify only
    runs a forward)."""
    from megatron.core import parallel_state as ps

    from megatron_tr1.backend import resolve
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.models import build_model
    from megatron_tr1.models.positions import get_rope_index

    backend = dataclasses.replace(init_parallel(tp, pp, backend=resolve(spec)), dtype=DTYPES[dtype])
    device = backend.device
    config = _hf_config(Path(mcore_dir) / HF_SUBDIR)
    model = build_model(config, layer_spec=backend.layer_spec, params_dtype=backend.dtype,
                        cpu_init=not backend.cuda).to(device)
    load_weights(model, mcore_dir)
    model.eval()
    tp_rank = ps.get_tensor_model_parallel_rank()
    inputs = {k: v.to(device) for k, v in batch.items()}
    position_ids = get_rope_index(config, inputs["input_ids"], None, video_grid_thw=inputs["video_grid_thw"],
                                  second_per_grid_ts=inputs["second_per_grid_ts"])
    b, s = inputs["input_ids"].shape
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            model.set_input_tensor(_pipeline_hop(None, (s, b, config.text_config.hidden_size), DTYPES[dtype],
                                                 device, send=False))
        out = model(inputs["input_ids"], position_ids,
                    pixel_values_videos=inputs["pixel_values_videos"].to(DTYPES[dtype]),
                    video_grid_thw=inputs["video_grid_thw"])
        if not ps.is_pipeline_last_stage():
            return _pipeline_hop(out, None, None, None, send=True)
    # numpy, not a tensor: torch's queue shares tensors by fd, which dies with this process
    return out.float().cpu().numpy() if tp_rank == 0 else None


def hf_logits(hf_dir: str, dtypes: list[str], batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Logits (float32, CPU) of the HF model in ``hf_dir`` on ``batch`` in each of ``dtypes`` (float32 first), at
    ``get_rope_index``'s M-RoPE positions. The model loads once, in float32, and its parameters are cast in place
    for each further dtype (buffers such as the rotary frequencies stay float32, as ``from_pretrained(dtype=...)``
    leaves them): one copy of the weights at a time."""
    from megatron_tr1.models.family import family_of, hf_classes
    from megatron_tr1.models.positions import get_rope_index

    model_class = hf_classes(family_of(Path(hf_dir), f"--hf-dir {hf_dir}"))[1]
    model = model_class.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    position_ids = get_rope_index(model.config, batch["input_ids"], video_grid_thw=batch["video_grid_thw"],
                                  second_per_grid_ts=batch["second_per_grid_ts"]).to(device)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "pixel_values_videos", "video_grid_thw")}
    out = {}
    for dtype in sorted(dtypes, key=lambda d: d != "float32"):  # float32 first: casting down is exact rounding
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(DTYPES[dtype])
            pixels = inputs["pixel_values_videos"].to(DTYPES[dtype])
            out[dtype] = model(**{**inputs, "pixel_values_videos": pixels},
                               position_ids=position_ids).logits.float().cpu()
    return out


@dataclasses.dataclass
class Verdict:
    ok: bool
    diff: float  # max|Megatron - HF fp32|: the last line's max_abs_logit_diff
    lines: list[str]  # printed before it (the first after tp=.. pp=..), the last ending in OK or FAIL


def judge(ours: torch.Tensor, reference: torch.Tensor, noisy: torch.Tensor | None = None, rtol: float | None = None,
          noise_factor: float = DEFAULT_NOISE_FACTOR, low: str = "bf16") -> Verdict:
    """Megatron's logits ``ours`` against HF's in float32 (``reference``) and, for a low-precision verify, HF's in
    that precision (``noisy``, named ``low``): the noise floor. Without ``noisy``: pass iff max|ours - ref| <=
    rtol x max|ref| (rtol default 1e-4). With it: pass iff the max and the RMS of |ours - ref| are each <=
    ``noise_factor`` x those of |noisy - ref| + 1e-4 x max|ref|; an explicit ``rtol`` replaces that test."""
    scale = reference.abs().max().item()
    err = ours.float() - reference
    diff = err.abs().max().item()
    if noisy is None:
        rtol = DEFAULT_RTOL if rtol is None else rtol
        ok = diff <= rtol * scale
        return Verdict(ok, diff, [f"max|logit|={scale:.4g} tolerance={rtol * scale:.3g} ({rtol:g} x max|logit|): "
                                  + ("OK" if ok else "FAIL")])
    noise = noisy.float() - reference
    rms, noise_max, noise_rms = _rms(err), noise.abs().max().item(), _rms(noise)
    if rtol is None:
        floor = DEFAULT_RTOL * scale
        ok = diff <= noise_factor * noise_max + floor and rms <= noise_factor * noise_rms + floor
        limit = f"limit {noise_factor:g} x noise floor + {floor:.2g}, max and rms"
    else:
        ok = diff <= rtol * scale
        limit = f"--rtol: tolerance={rtol * scale:.3g} ({rtol:g} x max|logit|)"
    summary = f"max|logit|={scale:.4g} max|mcore - hf_{low}|={(ours - noisy).abs().max().item():.4g}"
    rms_line = (f"rms|mcore - hf_fp32|={rms:.4g} noise floor rms|hf_{low} - hf_fp32|={noise_rms:.4g} "
                f"ratio={_ratio(rms, noise_rms)}")
    max_line = (f"max|mcore - hf_fp32|={diff:.4g} noise floor max|hf_{low} - hf_fp32|={noise_max:.4g} "
                f"ratio={_ratio(diff, noise_max)} ({limit}): {'OK' if ok else 'FAIL'}")
    return Verdict(ok, diff, [summary, rms_line, max_line])


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}" if b > 0 else "inf"


def _hf_config(folder: Path):
    """The transformers config of the model folder ``folder``, of its family's class."""
    from megatron_tr1.models.family import family_of, hf_classes

    return hf_classes(family_of(folder, str(folder / "config.json")))[0].from_pretrained(folder)


def main(args: argparse.Namespace) -> int:
    from megatron_tr1.backend import resolve
    from megatron_tr1.launch import run_ranks

    if args.noise_factor <= 0:
        raise ConfigError(f"--noise-factor {args.noise_factor:g}: must be > 0")
    # the family first (models/family.py): a Qwen3-VL folder is named as such, not read as a Qwen2.5-VL one
    require_supported(Path(args.hf_dir), f"--hf-dir {args.hf_dir}", "tr1 verify")
    meta = read_meta(args.mcore_dir)
    tp, pp = args.tp or meta.tp, args.pp or meta.pp
    backend = resolve(args.spec)
    spec = backend.layer_spec
    if backend.cuda and torch.cuda.device_count() < tp * pp:
        raise ConfigError(f"--tp {tp} x --pp {pp} needs {tp * pp} GPUs; this node has {torch.cuda.device_count()}")
    config = _hf_config(Path(args.hf_dir))
    batch = synthetic_batch(config, args.seed)
    ranks = run_ranks(megatron_logits, tp * pp, str(args.mcore_dir), tp, pp, spec, args.dtype, batch,
                      timeout=3600, threads=max(1, (os.cpu_count() or 1) // (tp * pp)),
                      dist_backend=backend.dist_backend)
    ours = torch.from_numpy(next(r for r in ranks if r is not None))
    hf = hf_logits(args.hf_dir, sorted({"float32", args.dtype}), batch, backend.device)
    noisy = hf[args.dtype] if args.dtype != "float32" else None
    verdict = judge(ours, hf["float32"], noisy, args.rtol, args.noise_factor,
                    low={"bfloat16": "bf16"}.get(args.dtype, args.dtype))
    first, *rest = verdict.lines
    print(f"tp={tp} pp={pp} spec={spec} dtype={args.dtype} tokens={ours.shape[0]}x{ours.shape[1]} {first}")
    for line in rest:
        print(line)
    print(f"max_abs_logit_diff={verdict.diff:.6g}")
    return 0 if verdict.ok else 1
