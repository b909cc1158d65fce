"""``tr1 verify``: the Megatron model on a tr1 checkpoint and the HF model give the same logits.

Starts TP x PP worker processes (``launch.run_ranks``: gloo on CPU, NCCL on GPU, as ``backend.resolve`` says),
each loading its shard through ``convert.weights.load_weights`` (so a checkpoint stored at another layout or
in the other spelling loads alike) and running ``Qwen2_5_VLModel`` forward
on one text + video batch; pipeline stages hand hidden states on with point-to-point sends. The HF model
runs the same batch in this process, given the M-RoPE positions of our ``get_rope_index`` (which the workers
compute for themselves), so Megatron's M-RoPE is checked at the positions training uses. HF's own positions
differ from those after a video whose temporal ids run past its spatial ones (``rope_index`` docstring), as
the first video's here do. The batch is synthetic and seeded: random token ids around one random video per
row, patchified by the training pipeline's ``data.processor``. The last line printed is
``max_abs_logit_diff=<value>``; the exit status is 1 when it exceeds ``rtol * max|HF logit|``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from megatron_tr1.convert.checkpoint import HF_SUBDIR, read_meta
from megatron_tr1.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_RTOL = {"float32": 1e-4, "bfloat16": 5e-2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint (save_pretrained directory)")
    parser.add_argument("--mcore-dir", required=True, help="tr1 Megatron checkpoint (`tr1 convert hf-to-mcore`)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the stored one)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: the stored one)")
    parser.add_argument("--spec", choices=("auto", "local", "te"), default="auto",
                        help="Megatron layer spec (auto: te on a GPU with transformer-engine, else local)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype of both models")
    parser.add_argument("--rtol", type=float, default=None,
                        help="tolerance relative to max|logit| (default: 1e-4 float32, 5e-2 bfloat16)")
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
    from transformers import Qwen2_5_VLConfig

    from megatron_tr1.backend import resolve
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.distributed import init_parallel
    from megatron_tr1.models.qwen2_5_vl.model import Qwen2_5_VLModel
    from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index

    backend = dataclasses.replace(init_parallel(tp, pp, backend=resolve(spec)), dtype=DTYPES[dtype])
    device = backend.device
    config = Qwen2_5_VLConfig.from_pretrained(Path(mcore_dir) / HF_SUBDIR)
    model = Qwen2_5_VLModel(config, layer_spec=backend.layer_spec, params_dtype=backend.dtype,
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


def hf_logits(hf_dir: str, dtype: str, batch: dict, device: torch.device) -> torch.Tensor:
    """Logits of the HF model in ``hf_dir`` on ``batch``, at ``get_rope_index``'s M-RoPE positions."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=DTYPES[dtype]).to(device).eval()
    position_ids = get_rope_index(model.config, batch["input_ids"], video_grid_thw=batch["video_grid_thw"],
                                  second_per_grid_ts=batch["second_per_grid_ts"])
    inputs = {k: batch[k].to(device) for k in ("input_ids", "pixel_values_videos", "video_grid_thw")}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(DTYPES[dtype])
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids.to(device)).logits.float().cpu()


def main(args: argparse.Namespace) -> int:
    from transformers import Qwen2_5_VLConfig

    from megatron_tr1.backend import resolve
    from megatron_tr1.launch import run_ranks

    meta = read_meta(args.mcore_dir)
    tp, pp = args.tp or meta.tp, args.pp or meta.pp
    backend = resolve(args.spec)
    spec = backend.layer_spec
    if backend.cuda and torch.cuda.device_count() < tp * pp:
        raise ConfigError(f"--tp {tp} x --pp {pp} needs {tp * pp} GPUs; this node has {torch.cuda.device_count()}")
    config = Qwen2_5_VLConfig.from_pretrained(args.hf_dir)
    batch = synthetic_batch(config, args.seed)
    ranks = run_ranks(megatron_logits, tp * pp, str(args.mcore_dir), tp, pp, spec, args.dtype, batch,
                      timeout=3600, threads=max(1, (os.cpu_count() or 1) // (tp * pp)),
                      dist_backend=backend.dist_backend)
    ours = torch.from_numpy(next(r for r in ranks if r is not None))
    theirs = hf_logits(args.hf_dir, args.dtype, batch, backend.device)
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL[args.dtype]
    ok = diff <= rtol * scale
    print(f"tp={tp} pp={pp} spec={spec} dtype={args.dtype} tokens={theirs.shape[0]}x{theirs.shape[1]} "
          f"max|logit|={scale:.4g} tolerance={rtol * scale:.3g} ({rtol:g} x max|logit|): {'OK' if ok else 'FAIL'}")
    print(f"max_abs_logit_diff={diff:.6g}")
    return 0 if ok else 1
