"""Models and broken checkpoints for the ``tr1 verify`` tests.

``deep_hf_model`` is a tiny-but-deep random Qwen2.5-VL where bfloat16 rounding noise is as large, relative to the
logits, as on the real Qwen2.5-VL-3B architecture with random weights: 36 LM layers of width 128, initialised with
std 0.1, so each matmul has a gain of about 0.1 x sqrt(128) = 1.1, near the 3B model's 0.02 x sqrt(2048) = 0.9
(at the default 0.02 a 128-wide layer barely changes the residual stream and bf16 noise stays ~2% of max|logit|).
Measured on CPU: HF bf16 differs from HF fp32 by 0.287 at max|logit| 5.05, and Megatron bf16 from HF bf16 by
0.39, so the old fixed tolerance 5e-2 x max|logit| = 0.25 fails this correct conversion, as it did at real size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_tr1.convert import integrity

DEEP = dict(num_hidden_layers=36, hidden_size=128, intermediate_size=256, num_attention_heads=4,
            initializer_range=0.1)
HEAD_DIM = DEEP["hidden_size"] // DEEP["num_attention_heads"]


def deep_hf_model(seed: int = 0):
    from megatron_tr1.demo import tiny_hf_model

    return tiny_hf_model(seed=seed, **DEEP)


def swap_heads(mcore_dir: str | Path, layer: int, a: int = 0, b: int = 1) -> None:
    """Break a TP1/TP2, PP1 checkpoint in place: heads ``a`` and ``b`` (both on TP rank 0) of LM ``layer`` trade
    places in the attention output projection, as a wrong head order in a conversion would."""
    name = f"language_model.decoder.layers.{layer}.self_attention.linear_proj.weight"
    path, state = next((f, s) for f in sorted((Path(mcore_dir) / "mp_rank_00_000").glob("*.safetensors"))
                       if name in (s := load_file(str(f))))
    w = state[name]
    cols = [slice(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in (a, b)]
    w[:, cols[0]], w[:, cols[1]] = w[:, cols[1]].clone(), w[:, cols[0]].clone()
    save_file(state, str(path), metadata={"format": "pt"})
    integrity.write_checksum(path)  # a deliberate edit: the checksum follows it


def cast_equals_bf16_load(hf_dir: str) -> bool:
    """``verify.hf_logits`` (float32, then its parameters cast in place) gives bitwise the bf16 logits of the model
    loaded in bfloat16."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_tr1.convert.verify import hf_logits, synthetic_batch
    from megatron_tr1.models.qwen2_5_vl.rope_index import get_rope_index

    batch = synthetic_batch(Qwen2_5_VLConfig.from_pretrained(hf_dir))
    cast = hf_logits(hf_dir, ["float32", "bfloat16"], batch, torch.device("cpu"))["bfloat16"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    position_ids = get_rope_index(model.config, batch["input_ids"], video_grid_thw=batch["video_grid_thw"],
                                  second_per_grid_ts=batch["second_per_grid_ts"])
    with torch.no_grad():
        loaded = model(input_ids=batch["input_ids"], video_grid_thw=batch["video_grid_thw"],
                       pixel_values_videos=batch["pixel_values_videos"].to(torch.bfloat16),
                       position_ids=position_ids).logits.float()
    return torch.equal(cast, loaded)
