"""The policy's weights on disk: the demo's model folder, loading into this rank's model, saving per rank.

- ``write_demo_model_dir(tiny, out)``: an HF Qwen2.5-VL folder (config, random weights, the tiny tokenizer
  and processor configs) from ``model.tiny`` - the demo then goes through the same ``model.hf_dir`` path as a
  real checkpoint.
- ``build_policy(hf_config, cfg)``: this rank's ``Qwen2_5_VLModel`` (layer spec picked by device: "te" on GPU
  when transformer-engine imports, "local" otherwise), parts frozen as ``model.freeze_*`` says.
- ``load_weights(model, source)``: from an HF folder (split by ``convert.mapping``) or from a tr1 Megatron
  checkpoint folder (``convert.checkpoint.load_mcore_state``: resharded when saved at another TP x PP).
- ``save_weights(model, out)``: every rank writes its shard into the tr1 Megatron checkpoint layout (what
  ``tr1 convert mcore-to-hf`` exports); the first rank writes ``tr1_mcore.json`` and the HF side files.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_tr1.convert import mapping
from megatron_tr1.convert.checkpoint import HF_SUBDIR, META, Meta, load_mcore_state, rank_dir
from megatron_tr1.convert.storage import SafetensorsDir, copy_hf_side_files
from megatron_tr1.errors import CheckpointError, ConfigError

WEIGHTS_FILE = "model.safetensors"


def write_demo_model_dir(tiny, out: str | Path, seed: int = 0) -> Path:
    """An HF folder holding a random Qwen2.5-VL of ``tiny``'s sizes (``rl.config.TinyModelConfig``), the tiny
    tokenizer (Qwen2.5-VL special tokens and chat template) and the processor configs. Idempotent."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_tr1.testing.tiny_model import tiny_hf_config
    from megatron_tr1.testing.tiny_tokenizer import build_tiny_tokenizer

    out = Path(out)
    if (out / "config.json").is_file() and (out / WEIGHTS_FILE).is_file():
        return out
    config = tiny_hf_config(
        tie_word_embeddings=True, num_hidden_layers=tiny.num_layers, vision_depth=tiny.vision_depth,
        hidden_size=tiny.hidden_size, num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_kv_heads,
        intermediate_size=tiny.intermediate_size)
    half = tiny.hidden_size // tiny.num_heads // 2  # M-RoPE sections in Qwen2.5-VL's 1/4, 3/8, 3/8 ratio
    config.text_config.rope_parameters["mrope_section"] = [half // 4, (half - half // 4) // 2,
                                                           half - half // 4 - (half - half // 4) // 2]
    vc = config.vision_config
    vc.depth, vc.hidden_size, vc.num_heads = tiny.vision_depth, tiny.vision_hidden_size, tiny.vision_heads
    vc.intermediate_size, vc.patch_size = 2 * tiny.vision_hidden_size, tiny.patch_size
    vc.window_size = 8 * tiny.patch_size  # 4x4 merged tokens per window, as Qwen2.5-VL's 112 px
    vc.fullatt_block_indexes = [tiny.vision_depth - 1]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer = build_tiny_tokenizer(tmp)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        processor = json.loads((tmp / name).read_text())
        processor["patch_size"] = tiny.patch_size
        (tmp / name).write_text(json.dumps(processor, indent=2) + "\n")
    del tokenizer
    tmp.rename(out)
    return out


def load_hf_config_and_tokenizer(hf_dir: str | Path):
    """``(Qwen2_5_VLConfig, tokenizer)`` of an HF folder (ConfigError naming what is missing)."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"model.hf_dir={str(hf_dir)!r}: no config.json there; point it at a Qwen2.5-VL folder "
                          f"(e.g. downloaded Qwen/Qwen2.5-VL-3B-Instruct, or exported with tr1 convert mcore-to-hf)")
    config = Qwen2_5_VLConfig.from_pretrained(hf_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.hf_dir={str(hf_dir)!r}: cannot load its tokenizer ({e})") from None
    return config, tokenizer


def layer_spec() -> str:
    """"te" where CUDA and transformer-engine are available, else megatron-core's "local" layers."""
    if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None:
        return "te"
    return "local"


def build_policy(hf_config, model_cfg) -> torch.nn.Module:
    """This rank's model (parallel state initialised), frozen as ``model_cfg.freeze_*`` says, on the device."""
    from megatron_tr1.models.qwen2_5_vl import Qwen2_5_VLModel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[model_cfg.dtype]
    on_gpu = torch.cuda.is_available()
    if dtype == torch.bfloat16 and not on_gpu:
        raise ConfigError("model.dtype=bf16 needs a GPU; the CPU path is fp32: set model.dtype=fp32")
    model = Qwen2_5_VLModel(hf_config, layer_spec=layer_spec(), params_dtype=dtype, cpu_init=not on_gpu,
                            recompute=model_cfg.recompute)
    model.freeze(model_cfg.freeze_vision, model_cfg.freeze_merger, model_cfg.freeze_llm)
    return model.cuda() if on_gpu else model


def _rank_info() -> tuple[int, int, int, int]:
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def load_weights(model: torch.nn.Module, source: str | Path, spec: str = "local") -> str:
    """Load this rank's weights from an HF folder or a tr1 Megatron checkpoint folder; returns which it was."""
    source = Path(source)
    tp_rank, tp, pp_rank, pp = _rank_info()
    if (source / META).is_file():
        state, kind = load_mcore_state(source, tp_rank, tp, pp_rank, pp, spec), "tr1-mcore"
    elif (source / "config.json").is_file():
        hf_config = json.loads((source / "config.json").read_text())
        state = mapping.hf_to_mcore_state(SafetensorsDir(source), hf_config, tp_rank, tp, pp_rank, pp, spec)
        kind = "hf"
    else:
        raise CheckpointError(f"{source}: neither an HF model folder (config.json) nor a tr1 Megatron checkpoint "
                              f"({META})")
    current = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in current:
                raise CheckpointError(f"{source}: tensor {name} has no place in this model")
            current[name].copy_(tensor)
    missing = [k for k in current if mapping.is_weight_name(k) and k not in state]
    if missing:
        raise CheckpointError(f"{source}: no weights for {mapping.name_list(missing)}")
    return kind


def save_weights(model: torch.nn.Module, out: Path, hf_dir: str | Path, spec: str = "local") -> None:
    """This rank's shard as ``out/mp_rank_TT_PPP/model.safetensors``; DP rank 0 of each model-parallel rank
    writes, global rank 0 adds ``tr1_mcore.json`` and ``hf/`` (config, tokenizer). Collective-free."""
    from safetensors.torch import save_file

    tp_rank, tp, pp_rank, pp = _rank_info()
    if ps.get_data_parallel_rank() == 0:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if mapping.is_weight_name(k)}
        folder = out / rank_dir(tp_rank, pp_rank)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / WEIGHTS_FILE))
    if not dist.is_initialized() or dist.get_rank() == 0:
        copy_hf_side_files(hf_dir, out / HF_SUBDIR)
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        dims = mapping.Dims.from_hf_config(hf_config)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        meta = Meta(tp=tp, pp=pp, spec=spec, num_layers=dims.layers, dtype=dtype, tied_embeddings=dims.tied,
                    files={rank_dir(t, p): [WEIGHTS_FILE] for t in range(tp) for p in range(pp)})
        (out / META).write_text(meta.to_json())
