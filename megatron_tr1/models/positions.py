"""M-RoPE position ids of a prompt or a batch, for whichever model family ``hf_config`` is.

``get_rope_index(hf_config, input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts)`` ->
``[3, b, s]``: Qwen2.5-VL's (``models.qwen2_5_vl.rope_index``: temporal ids from ``second_per_grid_ts``) or
Qwen3-VL's (``models.qwen3_vl.rope_index``: one grid per frame, time given to the model as text timestamps, so
``second_per_grid_ts`` is not used). The trainer (``rl.prompts``) and the engines (``rollout.engine``,
``rollout.vllm_worker``) all call this one function, so they agree on positions for both families.
"""
from __future__ import annotations

import torch

from megatron_tr1.models.family import QWEN3_VL, family_of


def get_rope_index(hf_config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids ``[3, b, s]`` (long) of ``input_ids`` ``[b, s]`` for ``hf_config``'s family."""
    if family_of(hf_config, "hf_config") == QWEN3_VL:
        from megatron_tr1.models.qwen3_vl.rope_index import get_rope_index as qwen3_vl

        return qwen3_vl(hf_config, input_ids, attention_mask=attention_mask, image_grid_thw=image_grid_thw,
                        video_grid_thw=video_grid_thw)
    from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index as qwen2_5_vl

    return qwen2_5_vl(hf_config, input_ids, attention_mask=attention_mask, image_grid_thw=image_grid_thw,
                      video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
