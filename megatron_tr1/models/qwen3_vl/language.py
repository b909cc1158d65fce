"""The Qwen3 decoder: Qwen2.5-VL's ``LanguageModel`` (megatron-core ``GPTModel``) with interleaved M-RoPE.

megatron-core 0.16.1's ``MultimodalRotaryEmbedding`` splits the frequencies into contiguous T / H / W blocks
(Qwen2.5-VL). Qwen3-VL interleaves them (``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``): frequency
``j`` takes the H position when ``j % 3 == 1`` and ``j < 3 * section[1]``, the W position when ``j % 3 == 2`` and
``j < 3 * section[2]``, else the T position. ``InterleavedMRoPE`` computes those angles ``[s, b, 1, head_dim]``
(``cat(freqs, freqs)``, the rotate-half layout megatron's ``apply_rotary_pos_emb`` uses, as HF's) and replaces the
GPTModel's rotary module, so ``GPTModel.forward`` and ``final_hidden`` both use it. QK-norm comes from the layer
spec (``q_layernorm`` / ``k_layernorm`` over head_dim, applied before the rotary, as HF's ``q_norm`` / ``k_norm``).
"""
from __future__ import annotations

import torch

from megatron_tr1.models.qwen2_5_vl.language import LanguageModel as Qwen2_5_LanguageModel


def interleaved_mrope_index(mrope_section: list[int], half: int) -> torch.Tensor:
    """Which position axis (0 = T, 1 = H, 2 = W) each of the ``half = head_dim / 2`` frequencies uses."""
    j = torch.arange(half)
    axis = torch.zeros(half, dtype=torch.long)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


class InterleavedMRoPE(torch.nn.Module):
    """Qwen3-VL's M-RoPE angles from ``position_ids`` ``[3, b, s]``: ``[s, b, 1, head_dim]`` float32."""

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", interleaved_mrope_index(mrope_section, head_dim // 2), persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        """``mrope_section`` / ``cp_group``: GPTModel's call signature (the section is fixed at construction;
        context parallelism is not used)."""
        pos = position_ids.to(self.inv_freq.device).float()  # [3, b, s]
        freqs = pos[..., None] * self.inv_freq  # [3, b, s, half]
        index = self.axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index)[0]  # [b, s, half]
        return torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :].contiguous()


class LanguageModel(Qwen2_5_LanguageModel):
    """Qwen2.5-VL's decoder wrapper with Qwen3-VL's interleaved M-RoPE (the layer spec brings QK-norm)."""

    def __init__(self, config, hf_config, specs, pre_process: bool, post_process: bool):
        super().__init__(config, hf_config, specs, pre_process, post_process)
        text = hf_config.text_config
        self.rotary_pos_emb = InterleavedMRoPE(config.kv_channels, text.rope_parameters["rope_theta"],
                                               list(text.rope_parameters["mrope_section"]))
