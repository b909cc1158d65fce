"""Test support: the tiny random Qwen2.5-VL (``megatron_tr1.demo.tiny_hf_model``) as a megatron-core model on the
same weights, a matching video batch, and HF logits at given positions.

The video batch has 4x6 merged tokens per frame, 2x2 windows in the vision tower; token ids come from
``demo.TINY_SPECIAL_TOKENS``.
"""
from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_tr1.demo import TINY_SPECIAL_TOKENS

VIDEO_GRID_THW = (2, 8, 12)  # (t, h, w) in patches: 2 x 4 x 6 = 48 merged tokens per video


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with 0 to one length: ``input_ids`` and ``attention_mask`` (1 = token) ``[b, s]``."""
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


def tiny_video_batch(config: Qwen2_5_VLConfig, seed: int = 0, with_video: bool = True) -> dict:
    """Two left-padded prompts of different lengths; with a video, each holds one of two videos.

    Returns ``input_ids``, ``attention_mask`` (1 = token) and, with video, ``pixel_values_videos``,
    ``video_grid_thw`` and ``second_per_grid_ts`` (different per video, so temporal positions differ; the first
    video's temporal ids run past its spatial ones, where HF 5.x's own positions differ from ``get_rope_index``).
    """
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    t, h, w = VIDEO_GRID_THW
    n_video = t * h * w // vc.spatial_merge_size ** 2 if with_video else 0
    vocab = config.text_config.vocab_size
    rows = []
    for prefix, suffix in ((5, 9), (2, 4)):
        words = torch.randint(16, vocab, (prefix + suffix,), generator=g).tolist()
        video = ([TINY_SPECIAL_TOKENS["<|vision_start|>"]] + [config.video_token_id] * n_video
                 + [TINY_SPECIAL_TOKENS["<|vision_end|>"]]) if with_video else []
        rows.append(words[:prefix] + video + words[prefix:])
    input_ids, attention_mask = left_pad(rows)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if with_video:
        patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        batch.update(pixel_values_videos=torch.randn(2 * t * h * w, patch, generator=g),
                     video_grid_thw=torch.tensor([VIDEO_GRID_THW] * 2),
                     second_per_grid_ts=torch.tensor([4.0, 0.5]))
    return batch


def hf_logits(hf_model: Qwen2_5_VLForConditionalGeneration, batch: dict, position_ids: torch.Tensor) -> torch.Tensor:
    """HF logits ``[b, s, v]`` for ``batch`` at the given positions ``[3, b, s]`` (``get_rope_index``'s, not HF's
    own). transformers 5.x uses a 3-row ``position_ids`` as is; a 4-row one (text positions first) is for packed
    sequences only."""
    keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")
    return hf_model(**{k: batch[k] for k in keys if k in batch}, position_ids=position_ids).logits


def tiny_mcore_model(hf_model: Qwen2_5_VLForConditionalGeneration, layer_spec: str = "local"):
    """This rank's ``Qwen2_5_VLModel`` holding ``hf_model``'s weights (parallel state initialised, CPU).

    Weights go through the one loader (``convert.weights.load_weights``, over ``convert.mapping``), so a test of
    this model also tests the mapping and the loader; every weight of the rank must be loaded.
    """
    from megatron_tr1.convert.weights import load_weights
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    model = Qwen2_5_VLModel(hf_model.config, layer_spec=layer_spec, cpu_init=True)
    load_weights(model, hf_model.state_dict(), hf_model.config)
    return model.eval()
