"""Tiny random Qwen2.5-VL models (HF and megatron-core on the same weights) and a matching video batch.

The sizes keep every feature of the real architecture active: GQA, M-RoPE with three sections, window
attention in the vision tower (4x6 merged tokens per frame, 2x2 windows) with one full-attention block,
and a 2x2 patch merger. Token ids come from ``TINY_SPECIAL_TOKENS``.
"""
from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_tr1.testing import TINY_SPECIAL_TOKENS

VIDEO_GRID_THW = (2, 8, 12)  # (t, h, w) in patches: 2 x 4 x 6 = 48 merged tokens per video


def tiny_hf_config(tie_word_embeddings: bool = False, num_key_value_heads: int = 2, num_hidden_layers: int = 4,
                   vision_depth: int = 3, **text_overrides) -> Qwen2_5_VLConfig:
    """A tiny ``Qwen2_5_VLConfig``: LM hidden 128 (4 heads of 32), vocab 512, vision hidden 64 (4 heads)."""
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=num_hidden_layers,
                num_attention_heads=4, num_key_value_heads=num_key_value_heads, rms_norm_eps=1e-6,
                max_position_embeddings=2048, bos_token_id=TINY_SPECIAL_TOKENS["<|endoftext|>"],
                eos_token_id=TINY_SPECIAL_TOKENS["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]})
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=64, intermediate_size=96, num_heads=4, in_channels=3,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                  window_size=16, out_hidden_size=text["hidden_size"], fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
        image_token_id=TINY_SPECIAL_TOKENS["<|image_pad|>"], video_token_id=TINY_SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=TINY_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=TINY_SPECIAL_TOKENS["<|vision_end|>"], attn_implementation="eager")


def tiny_hf_model(seed: int = 0, **cfg) -> Qwen2_5_VLForConditionalGeneration:
    """A random fp32 HF model from ``tiny_hf_config(**cfg)``; biases and norms are randomised too."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**cfg)).float().eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1; make every tensor matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


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
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
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
    """This rank's ``Qwen2_5_VLModel`` holding ``hf_model``'s weights (parallel state initialised).

    Weights go through ``megatron_tr1.convert.mapping.hf_to_mcore_state``, so a test of this model also
    tests the mapping; every weight of the rank must be loaded (``CheckpointError`` otherwise).
    """
    from megatron.core import parallel_state as ps

    from megatron_tr1.convert.mapping import hf_to_mcore_state, is_weight_name, name_list
    from megatron_tr1.errors import CheckpointError
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    model = Qwen2_5_VLModel(hf_model.config, layer_spec=layer_spec, cpu_init=True)
    state = hf_to_mcore_state(hf_model.state_dict(), hf_model.config, ps.get_tensor_model_parallel_rank(),
                              ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank(),
                              ps.get_pipeline_model_parallel_world_size(), spec=layer_spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if is_weight_name(k)]
    if missing or unexpected:
        raise CheckpointError(f"tiny model load: missing {name_list(missing)}; unexpected {name_list(unexpected)}")
    return model.eval()
