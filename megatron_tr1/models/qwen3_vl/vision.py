"""The Qwen3-VL vision tower on megatron-core blocks: patch embed (+ bias), learned positions, ViT, mergers, DeepStack.

Patches (``[n_patches, C*T*P*P]``, HF processor layout, merge units contiguous) -> Conv3d embed with bias (one
matmul, Qwen2.5-VL's ``PatchEmbed`` trick) + the learned ``pos_embed`` (a square grid bilinearly resampled,
``align_corners=True``, to each frame's ``h x w``, in merge-unit order: ``interpolation_taps``) -> ``depth``
TransformerLayers (LayerNorm, non-gated MLP) with Qwen2.5-VL's 2-D rotary (``rotary_freqs``), full attention
within each frame (each temporal patch: ``frame_cu_seqlens``), no windows -> merger (LayerNorm, 2x2 concat, fc1 ->
exact GELU -> fc2 to the LM hidden size). The outputs of the blocks in ``deepstack_visual_indexes`` each go through
their own merger with the norm after the concatenation (``use_postshuffle_norm``): the DeepStack features.
Attention, MLP and merger linears are TP-sharded; norms, patch and position embeddings are replicated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tr1.models.qwen2_5_vl.config import VISION_NORM_EPS
from megatron_tr1.models.qwen2_5_vl.specs import LayerSpecs
from megatron_tr1.models.qwen2_5_vl.vision import PatchEmbed, frame_cu_seqlens, rotary_freqs


def merge_unit_coords(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """(row, col, frame height, frame width) ``[n_patches]`` of every patch, patches listed merge unit by merge unit
    (block row, block col, row in block, col in block) within each frame, frames in order."""
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows.append(hh.reshape(blocks).transpose(1, 2).reshape(-1).repeat(t))
        cols.append(ww.reshape(blocks).transpose(1, 2).reshape(-1).repeat(t))
        heights.append(torch.full((t * h * w,), h))
        widths.append(torch.full((t * h * w,), w))
    return torch.cat(rows), torch.cat(cols), torch.cat(heights), torch.cat(widths)


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation on one axis, ``align_corners=True``: the two source taps ``[n, 2]`` (clamped to the grid)
    and their weights, for target ``index`` on an axis of length ``size`` resampled from ``side`` points."""
    src = index.float() * (side - 1) / (size - 1).clamp_min(1).float()
    floor = src.floor()
    taps = floor.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp_min(0)
    return taps.clamp(0, side - 1), weights


def interpolation_taps(grid_thw: torch.Tensor, merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[n_patches, 4]`` into the flattened ``side x side`` position table and bilinear weights: the
    table resampled to each frame's grid (``F.interpolate(mode="bilinear", align_corners=True)``), in merge-unit
    order."""
    row, col, height, width = merge_unit_coords(grid_thw, merge)
    h_taps, h_weights = _axis_taps(row, height, side)
    w_taps, w_weights = _axis_taps(col, width, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return index, weight


class PatchMerger(MegatronModule):
    """LayerNorm, concatenation of each 2x2 merge unit, fc1 (column-parallel) -> exact GELU -> fc2 (row-parallel).
    ``postshuffle``: the norm runs over the concatenation (DeepStack mergers), else over each patch."""

    def __init__(self, config: TransformerConfig, context_dim: int, merge: int, out_dim: int, postshuffle: bool):
        super().__init__(config)
        self.width = context_dim * merge * merge
        self.postshuffle = postshuffle
        self.norm = torch.nn.LayerNorm(self.width if postshuffle else context_dim, eps=VISION_NORM_EPS,
                                       dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.width, self.width, config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.width, out_dim, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.width)) if self.postshuffle else self.norm(x).view(-1, self.width)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class VisionTower(MegatronModule):
    """Pixel patches + ``grid_thw`` -> (merged visual token embeddings ``[n_patches / merge^2, lm_hidden]``, the
    DeepStack features: one tensor of that shape per entry of ``deepstack_visual_indexes``, in that order)."""

    def __init__(self, config: TransformerConfig, hf_config, specs: LayerSpecs):
        super().__init__(config)
        vc = hf_config.vision_config
        self.specs = specs
        self.merge = vc.spatial_merge_size
        self.head_dim = vc.hidden_size // vc.num_heads
        self.rope_theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.side = int(vc.num_position_embeddings ** 0.5)
        self.deepstack_indexes = list(vc.deepstack_visual_indexes)
        self.patch_embed = PatchEmbed(vc, config.params_dtype, bias=True)
        self.pos_embed = torch.nn.Embedding(vc.num_position_embeddings, vc.hidden_size, dtype=config.params_dtype)
        self.decoder = TransformerBlock(config, specs.vision_layer, post_layer_norm=False)
        self.merger = PatchMerger(config, vc.hidden_size, self.merge, vc.out_hidden_size, postshuffle=False)
        self.deepstack_merger_list = torch.nn.ModuleList(
            [PatchMerger(config, vc.hidden_size, self.merge, vc.out_hidden_size, postshuffle=True)
             for _ in self.deepstack_indexes])

    def tower_parts(self) -> list[torch.nn.Module]:
        """What ``model.freeze_vision`` freezes: the patch and position embeddings and the blocks."""
        return [self.patch_embed, self.pos_embed, self.decoder]

    def merger_parts(self) -> list[torch.nn.Module]:
        """What ``model.freeze_merger`` freezes: the main merger and DeepStack's."""
        return [self.merger, self.deepstack_merger_list]

    def positions(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The learned position embedding of every patch ``[n_patches, hidden]`` (bilinear over the table)."""
        index, weight = interpolation_taps(grid_thw, self.merge, self.side)
        device = self.pos_embed.weight.device
        return (self.pos_embed(index.to(device)) * weight.to(device, self.pos_embed.weight.dtype)[..., None]).sum(1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grid_thw = grid_thw.cpu()
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        x = (x + self.positions(grid_thw).to(x.dtype)).unsqueeze(1)  # [n, 1, h]: megatron's [s, b, h]
        freqs = rotary_freqs(grid_thw, self.merge, self.head_dim, self.rope_theta).to(device)[:, None, None, :]
        attention = self.specs.vision_attention(frame_cu_seqlens(grid_thw).to(device))
        deepstack = {}
        for i, layer in enumerate(self.decoder.layers):
            x = self.specs.run_vision_layer(layer, x, freqs, attention)
            if i in self.deepstack_indexes:
                k = self.deepstack_indexes.index(i)
                deepstack[k] = self.deepstack_merger_list[k](x.squeeze(1))
        return self.merger(x.squeeze(1)), [deepstack[k] for k in range(len(self.deepstack_indexes))]
