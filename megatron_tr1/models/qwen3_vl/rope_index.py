"""3-D M-RoPE position ids for Qwen3-VL, as transformers' ``Qwen3VLModel.get_rope_index`` and vLLM compute them.

Qwen3-VL's prompt gives every temporal patch of a video its own block, ``<t seconds>`` text then
``<|vision_start|>`` + ``h*w/merge^2`` pad tokens + ``<|vision_end|>`` (``data.prompt``), so a video grid
``(t, h, w)`` is ``t`` grids ``(1, h, w)`` and there is no ``second_per_grid_ts``: time lives in the timestamp text.
Text tokens advance all three axes by one. A block of pad tokens (one image, or one frame of a video) starting at
position ``start`` takes temporal id ``start`` and height/width ids ``start + row`` / ``start + col`` over the merged
grid; the text after it continues at ``start + max(h, w) / merge``, which is the block's largest id + 1 (its
temporal ids never run past its spatial ones, t being 1). Padding (``attention_mask == 0``) gets position 0 and is
skipped. Grids are consumed in order over the whole batch, a video's ``t`` frames one block each (pad tokens of
consecutive frames with no text between them take consecutive blocks).

This equals ``Qwen3VLModel.get_rope_index`` of transformers 5.19 (``modeling_qwen3_vl.py``: ``video_grid_thw``
repeated ``t`` times with t = 1, ``current_pos += max(grid_h, grid_w) // spatial_merge_size``) and vLLM 0.32's
``Qwen3VLForConditionalGeneration._get_mrope_input_positions`` (``st_idx = max + 1`` after each frame, the rule of
Qwen2.5-VL's original code); with t = 1 the two rules agree, so unlike Qwen2.5-VL (``models/qwen2_5_vl/rope_index``)
there is no difference to pin (``tests/models/test_qwen3_vl_rope_index.py`` checks both on the same tokens).
"""
from __future__ import annotations

import torch

from megatron_tr1.errors import ConfigError
from megatron_tr1.models.qwen2_5_vl.rope_index import vision_positions, walk_rows


def _frames(grid_thw: torch.Tensor | None) -> list[list[int]]:
    """Each ``(t, h, w)`` grid as ``t`` grids ``(1, h, w)``, in order."""
    return [[1, h, w] for t, h, w in (grid_thw.tolist() if grid_thw is not None else []) for _ in range(t)]


def get_rope_index(hf_config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Position ids ``[3, b, s]`` (long) for ``input_ids`` ``[b, s]``.

    ``hf_config`` is a ``Qwen3VLConfig``. Grids are consumed in order over the whole batch (images from
    ``image_grid_thw``, one block each; videos from ``video_grid_thw``, ``t`` blocks each of ``h*w/merge^2`` pad
    tokens). ConfigError when the pad tokens do not fit the grids.
    """
    merge = hf_config.vision_config.spatial_merge_size
    blocks = {hf_config.image_token_id: iter(_frames(image_grid_thw)),
              hf_config.video_token_id: iter(_frames(video_grid_thw))}

    def place(token, grid, pos, b, i, ids):
        kind = "video_grid_thw" if token == hf_config.video_token_id else "image_grid_thw"
        if grid is None:
            raise ConfigError(f"{kind}: more vision blocks in input_ids (row {b}) than the grids give "
                              f"(a video grid (t, h, w) gives t blocks)")
        h, w = grid[1] // merge, grid[2] // merge
        if ids[i:i + h * w] != [token] * (h * w):
            raise ConfigError(f"{kind}: a block of grid {grid} needs {h * w} consecutive pad tokens at row {b}, "
                              f"position {i}; input_ids hold fewer")
        return vision_positions(pos, grid, merge), h * w, pos + max(h, w)

    return walk_rows(input_ids, attention_mask, blocks, place)
