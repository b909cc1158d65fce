"""3-D M-RoPE position ids for Qwen2.5-VL, as the original Qwen2.5-VL code computes them.

Text tokens advance all three axes by one. A run of image/video pad tokens of one grid ``(t, h, w)`` (in
patches) takes temporal ids ``start + floor(i * interval)`` (``interval = tokens_per_second *
second_per_grid_ts`` for videos, 1 for images) and height/width ids ``start + row`` / ``start + col`` over
the merged grid; the text after it continues at the block's largest position (over all three axes) + 1.
Padding (``attention_mask == 0``) gets position 0 and is skipped.

This is ``get_rope_index`` of transformers 4.x (``st_idx = llm_pos_ids_list[-1].max() + 1``), which the
pretrained weights were trained with and which Temporal-R1, EasyR1 and verl use, and the rule of vLLM's
``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions`` (which floors the temporal ids in float64,
not float32: see ``rollout/vllm_worker.py``). transformers 5.x deviates: ``Qwen2_5_VLModel.get_rope_index``
(``modeling_qwen2_5_vl.py`` of 5.19, line 1051) advances ``current_pos += max(grid_h, grid_w) //
spatial_merge_size``, ignoring the temporal ids, so when a video's temporal ids run past its spatial ones all
later text sits too early (43 positions for a 30 s 448x448 clip at 2 fps), while its own ``rope_deltas``
(``max + 1 - len``) continue generation from the max. For images (t = 1) the two agree.
"""
from __future__ import annotations

import torch

from megatron_tr1.errors import ConfigError


def vision_positions(start: int, grid_thw: list[int], merge: int, interval: float = 1) -> torch.Tensor:
    """``[3, t*h*w/merge^2]`` ids of one vision block of grid ``(t, h, w)`` (in patches) starting at ``start``:
    temporal ``start + floor(i * interval)``, height / width ``start + row`` / ``start + col`` over the merged grid."""
    t, h, w = grid_thw[0], grid_thw[1] // merge, grid_thw[2] // merge
    tt = (torch.arange(t) * interval).long() + start
    hh = torch.arange(h) + start
    ww = torch.arange(w) + start
    return torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1)


def walk_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, blocks: dict, place) -> torch.Tensor:
    """Position ids ``[3, b, s]`` of ``input_ids`` ``[b, s]``, shared by both families' ``get_rope_index``.

    Text runs advance all three axes by one per token; at a token of ``blocks`` (token id -> iterator over its vision
    blocks' grids, consumed in order over the whole batch) ``place(token, grid, pos, row, i, ids)`` returns the
    block's ids ``[3, n]``, its token count ``n`` and the position the text after it starts at (``grid`` is None
    when the iterator is exhausted: ``place`` raises). Padding (``attention_mask == 0``) gets position 0."""
    position_ids = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b], dtype=bool)
        ids = input_ids[b][keep].tolist()
        pieces, pos, i = [], 0, 0
        while i < len(ids):
            token = ids[i]
            if token not in blocks:
                j = i
                while j < len(ids) and ids[j] not in blocks:
                    j += 1
                pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
                i = j
                continue
            block, n, pos = place(token, next(blocks[token], None), pos, b, i, ids)
            pieces.append(block)
            i += n
        if pieces:
            position_ids[:, b, keep] = torch.cat(pieces, dim=1)
    return position_ids.to(input_ids.device)


def get_rope_index(hf_config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids ``[3, b, s]`` (long) for ``input_ids`` ``[b, s]``.

    ``hf_config`` is a ``Qwen2_5_VLConfig``. Grids are consumed in order over the whole batch (images from
    ``image_grid_thw``, videos from ``video_grid_thw``); each grid covers ``t*h*w/merge^2`` pad tokens.
    """
    merge = hf_config.vision_config.spatial_merge_size
    tokens_per_second = hf_config.vision_config.tokens_per_second
    grids = {hf_config.image_token_id: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             hf_config.video_token_id: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])

    def place(token, grid, pos, b, i, ids):
        kind = "video_grid_thw" if token == hf_config.video_token_id else "image_grid_thw"
        if grid is None:
            raise ConfigError(f"{kind}: more vision runs in input_ids (row {b}) than grids given")
        n = grid[0] * grid[1] * grid[2] // merge ** 2
        if ids[i:i + n] != [token] * n:
            raise ConfigError(f"{kind}: grid {grid} needs {n} consecutive pad tokens at row {b}, "
                              f"position {i}; input_ids hold fewer")
        interval = tokens_per_second * next(seconds, 1.0) if token == hf_config.video_token_id else 1
        block = vision_positions(pos, grid, merge, interval)
        return block, n, int(block.max()) + 1

    return walk_rows(input_ids, attention_mask, grids, place)
