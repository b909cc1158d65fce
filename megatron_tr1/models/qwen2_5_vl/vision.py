"""The Qwen2.5-VL vision tower on megatron-core blocks: patch embed, windowed ViT, 2x2 patch merger.

Patches (``[n_patches, C*T*P*P]``, HF processor layout) -> Conv3d embed -> permuted window-major (merge
units grouped by ``window_size`` windows, HF's window index) -> ``depth`` TransformerLayers with 2-D rotary,
attending within windows except at ``fullatt_block_indexes`` (within each frame) -> merger (RMSNorm, 2x2
concat, fc1 -> GELU -> fc2 to the LM hidden size) -> original order. Attention and MLP are TP-sharded like
the LM (heads and ffn split over the TP group); the patch embed and norms are replicated.
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


def window_index(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's window permutation of merge units and the ``cu_seqlens`` (in patches) of the windows.

    ``window`` is the window side in merged tokens (``window_size // merge // patch_size``). Frames are
    tiled into ``window x window`` windows (the last row/column may be partial); the permutation lists the
    merge units of each window in row-major order, window after window, frame after frame.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in index:
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    block = frame[r:r + window, c:c + window].reshape(-1)
                    order.append(block + offset)
                    lengths.append(block.numel() * merge * merge)
        offset += t * gh * gw
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    return torch.cat(order), cu


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (in patches) of the frames: full attention stays within one temporal patch."""
    return F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0), (1, 0))


def rotary_freqs(grid_thw: torch.Tensor, merge: int, head_dim: int, theta: float) -> torch.Tensor:
    """2-D rotary angles ``[n_patches, head_dim]``: (row, col) frequencies over half the dims each, repeated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
    rows = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)  # patches listed merge unit by merge unit
        hw = torch.stack([hh.reshape(blocks).transpose(1, 2).reshape(-1),
                          ww.reshape(blocks).transpose(1, 2).reshape(-1)], dim=-1)
        rows.append(hw.repeat(t, 1))
    freqs = (torch.cat(rows).float()[..., None] * inv_freq).flatten(1)  # [n, head_dim / 2]: h then w
    return torch.cat([freqs, freqs], dim=-1)


class PatchEmbed(torch.nn.Module):
    """HF's Conv3d over (T, P, P) patches (its weight layout, for checkpoints), with a bias where the family has one
    (Qwen3-VL). The input rows are already cut into patches and the stride equals the kernel, so it is computed as one
    matmul (a Conv3d over ``[n, C, T, P, P]`` runs ~4x slower on CPU, forward and backward)."""

    def __init__(self, vision_hf_config, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        c = vision_hf_config
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = torch.nn.Conv3d(c.in_channels, c.hidden_size, kernel, stride=kernel, bias=bias, dtype=dtype)
        if bias:  # Qwen3-VL's; starts at zero until weights are loaded
            torch.nn.init.zeros_(self.proj.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(patches.reshape(-1, weight[0].numel()).to(weight.dtype), weight.flatten(1), self.proj.bias)


class PatchMerger(MegatronModule):
    """RMSNorm, concatenation of each 2x2 merge unit, fc1 (column-parallel) -> GELU -> fc2 (row-parallel)."""

    def __init__(self, config: TransformerConfig, context_dim: int, merge: int, out_dim: int):
        super().__init__(config)
        self.width = context_dim * merge * merge
        self.ln_q = torch.nn.RMSNorm(context_dim, eps=VISION_NORM_EPS, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.width, self.width, config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.width, out_dim, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_fc1(self.ln_q(x).view(-1, self.width))
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class VisionTower(MegatronModule):
    """Pixel patches + ``grid_thw`` -> merged visual token embeddings ``[n_patches / merge^2, lm_hidden]``."""

    def __init__(self, config: TransformerConfig, hf_config, specs: LayerSpecs):
        super().__init__(config)
        vc = hf_config.vision_config
        self.specs = specs
        self.merge = vc.spatial_merge_size
        self.window = vc.window_size // vc.spatial_merge_size // vc.patch_size
        self.full_attention = set(vc.fullatt_block_indexes)
        self.head_dim = vc.hidden_size // vc.num_heads
        self.rope_theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.patch_embed = PatchEmbed(vc, config.params_dtype)
        self.decoder = TransformerBlock(config, specs.vision_layer, post_layer_norm=False)
        self.merger = PatchMerger(config, vc.hidden_size, vc.spatial_merge_size, vc.out_hidden_size)

    def tower_parts(self) -> list[torch.nn.Module]:
        """What ``model.freeze_vision`` freezes: the patch embedding and the blocks."""
        return [self.patch_embed, self.decoder]

    def merger_parts(self) -> list[torch.nn.Module]:
        """What ``model.freeze_merger`` freezes."""
        return [self.merger]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.cpu()
        unit = self.merge * self.merge
        order, cu_window = window_index(grid_thw, self.merge, self.window)
        device = pixel_values.device

        def window_major(x):  # [n, ...] patches -> window-major order, merge units kept together
            return x.reshape(-1, unit, *x.shape[1:])[order.to(x.device)].reshape(x.shape)

        x = window_major(self.patch_embed(pixel_values)).unsqueeze(1)  # [n, 1, h]: megatron's [s, b, h]
        freqs = window_major(rotary_freqs(grid_thw, self.merge, self.head_dim, self.rope_theta))
        freqs = freqs.to(device)[:, None, None, :]
        window_attention = self.specs.vision_attention(cu_window.to(device))
        frame_attention = self.specs.vision_attention(frame_cu_seqlens(grid_thw).to(device))
        for i, layer in enumerate(self.decoder.layers):
            attention = frame_attention if i in self.full_attention else window_attention
            x = self.specs.run_vision_layer(layer, x, freqs, attention)
        merged = self.merger(x.squeeze(1))
        return merged[torch.argsort(order).to(device)]
