"""Test support: the tiny random Qwen3-VL (``megatron_tr1.demo.tiny_qwen3_vl_model``) as a megatron-core model on the
same weights, a matching batch (videos, optionally an image), HF's own M-RoPE positions and HF logits.

Videos are laid out as Qwen3-VL's processor lays them out: each frame (temporal patch) is its own
``<t> <|vision_start|> <|video_pad|>... <|vision_end|>`` run with a short timestamp of text tokens before it, so
``Qwen3VLModel.get_rope_index`` (which splits each video per frame) sees one video group per frame. The two videos
have different grids (so the learned position grid is resampled two ways).
"""
from __future__ import annotations

import torch

from megatron_tr1.demo import TINY_SPECIAL_TOKENS
from megatron_tr1.testing.tiny_model import left_pad

VIDEO_GRIDS = ((2, 8, 12), (2, 4, 8))  # (t, h, w) in patches of the two videos: 2 x 4 x 6 and 2 x 2 x 4 merged
IMAGE_GRID = (1, 4, 4)  # 2 x 2 merged tokens
MM_TYPES = {"text": 0, "image": 1, "video": 2}


def _vision_run(token: int, n: int) -> list[int]:
    return [TINY_SPECIAL_TOKENS["<|vision_start|>"]] + [token] * n + [TINY_SPECIAL_TOKENS["<|vision_end|>"]]


def tiny_qwen3_vl_batch(config, seed: int = 0, with_video: bool = True, with_image: bool = False) -> dict:
    """Two left-padded prompts of different lengths; with video, row ``i`` holds video ``i`` (frame by frame, with
    timestamps); with an image, row 0 also holds one image before its video.

    Returns ``input_ids``, ``attention_mask`` (1 = token), ``mm_token_type_ids`` (0 text, 1 image, 2 video) and the
    pixel inputs (``pixel_values_videos`` / ``video_grid_thw``, ``pixel_values`` / ``image_grid_thw``).
    """
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    merge = vc.spatial_merge_size ** 2
    vocab = config.text_config.vocab_size
    words = lambda n: torch.randint(16, vocab, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for i, (prefix, suffix) in enumerate(((5, 9), (2, 4))):
        row = words(prefix)
        if with_image and i == 0:
            row += _vision_run(config.image_token_id, IMAGE_GRID[1] * IMAGE_GRID[2] // merge) + words(1)
        if with_video:
            t, h, w = VIDEO_GRIDS[i]
            for _ in range(t):
                row += words(2) + _vision_run(config.video_token_id, h * w // merge)
        rows.append(row + words(suffix))
    input_ids, attention_mask = left_pad(rows)
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = MM_TYPES["image"]
    types[input_ids == config.video_token_id] = MM_TYPES["video"]
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types)
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    if with_video:
        n = sum(t * h * w for t, h, w in VIDEO_GRIDS)
        batch.update(pixel_values_videos=torch.randn(n, patch, generator=g), video_grid_thw=torch.tensor(VIDEO_GRIDS))
    if with_image:
        batch.update(pixel_values=torch.randn(IMAGE_GRID[1] * IMAGE_GRID[2], patch, generator=g),
                     image_grid_thw=torch.tensor([IMAGE_GRID]))
    return batch


def hf_positions(hf_model, batch: dict) -> torch.Tensor:
    """HF's own M-RoPE positions ``[3, b, s]`` (``Qwen3VLModel.get_rope_index``; padding gets 0)."""
    position_ids, _ = hf_model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"])
    return position_ids


VISUAL_KEYS = ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw")


def hf_logits(hf_model, batch: dict, position_ids: torch.Tensor) -> torch.Tensor:
    """HF logits ``[b, s, v]`` for ``batch`` at ``position_ids`` ``[3, b, s]``."""
    keys = ("input_ids", "attention_mask", *VISUAL_KEYS)
    return hf_model(**{k: batch[k] for k in keys if k in batch}, position_ids=position_ids).logits


def tiny_mcore_qwen3_vl(hf_model, layer_spec: str = "local", **kwargs):
    """This rank's ``Qwen3VLModel`` holding ``hf_model``'s weights (parallel state initialised, CPU), loaded through
    the one loader (``convert.weights.load_weights`` over ``convert.mapping``); ``kwargs`` go to the model
    (e.g. ``recompute``)."""
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.models import build_model

    model = build_model(hf_model.config, layer_spec=layer_spec, cpu_init=True, **kwargs)
    load_weights(model, hf_model.state_dict(), hf_model.config)
    return model.eval()
