"""THE weight loader (and saver) of a live model: any source into this rank's shard, matched by spelling-free name.

``load_weights(model, source)`` fills this rank's ``Qwen2_5_VLModel`` (parallel state initialised) from an HF
folder, a tr1 Megatron checkpoint folder (resharded when stored at another TP x PP; ``convert.checkpoint``) or an
in-memory HF state dict. Names are matched in their spelling-independent form (``mapping.mcore_local_name``), so a
``local`` or ``te`` checkpoint loads into a ``local`` or ``te`` model alike; every weight of the rank must be
given, none may be left over and shapes must agree (``CheckpointError`` naming the source and the tensors).
The trainer, ``tr1 verify``, ``tr1 selftest``, the benchmarks and the tests load through here.

Every tensor loaded must be finite (a NaN or inf is refused, naming the tensor and the source); tr1 checkpoints are
checked against their checksums first (``convert.checkpoint``).

``save_weights(model, out, hf_dir)`` writes this rank's shard into the tr1 Megatron layout in the spelling the
model actually has (``tr1_mcore.json``'s ``spec`` says which), with its SHA-256 beside it (``convert.integrity``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from megatron_tr1.convert import integrity, mapping
from megatron_tr1.convert.checkpoint import HF_SUBDIR, META, Meta, load_mcore_state, rank_dir
from megatron_tr1.convert.storage import SafetensorsDir, copy_hf_side_files
from megatron_tr1.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"


def model_spelling(state_names) -> str:
    """"te" when any name has transformer-engine's fused-norm spelling, else "local"."""
    return "te" if any(mapping.mcore_local_name(n) != n for n in state_names) else "local"


def _rank_info() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def rank_state(source, hf_config=None) -> tuple[dict[str, torch.Tensor], str]:
    """This rank's Megatron state dict (local spelling) from ``source`` and what the source was ("hf", "tr1-mcore",
    "hf-state"). ``source``: an HF folder, a tr1 Megatron checkpoint folder, or an HF state dict (either HF
    layout; ``hf_config`` is then its config)."""
    tp_rank, tp, pp_rank, pp = _rank_info()
    if isinstance(source, Mapping):
        if hf_config is None:
            raise ValueError("rank_state: an in-memory HF state needs its hf_config")
        return mapping.hf_to_mcore_state(source, hf_config, tp_rank, tp, pp_rank, pp), "hf-state"
    source = Path(source)
    if (source / META).is_file():
        return load_mcore_state(source, tp_rank, tp, pp_rank, pp), "tr1-mcore"
    if (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text())
        state = mapping.hf_to_mcore_state(SafetensorsDir(source), config, tp_rank, tp, pp_rank, pp)
        return state, "hf"
    raise CheckpointError(f"{source}: neither an HF model folder (config.json) nor a tr1 Megatron checkpoint "
                          f"({META})")


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` (either spelling) into ``model`` (either spelling): every weight, no extra, same shapes."""
    current = {mapping.mcore_local_name(k): v for k, v in model.state_dict().items() if mapping.is_weight_name(k)}
    given = {mapping.mcore_local_name(k): v for k, v in state.items() if mapping.is_weight_name(k)}
    extra, missing = given.keys() - current.keys(), current.keys() - given.keys()
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} tensor(s) with no place in this model: "
                              f"{mapping.name_list(extra)}")
    if missing:
        raise CheckpointError(f"{where}: no weights for {len(missing)} tensor(s) of this model: "
                              f"{mapping.name_list(missing)}")
    wrong = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in current.items()
             if tuple(given[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{where}: shapes differ from this model's (given vs model): {', '.join(wrong[:6])}"
                              f"{' ...' if len(wrong) > 6 else ''}; the weights belong to another config")
    bad = [k for k, v in given.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold NaN or inf values: {mapping.name_list(bad)}; "
                              f"the weights are diverged or corrupted: use another checkpoint")
    with torch.no_grad():
        for name, target in current.items():
            target.copy_(given[name])


def load_weights(model: torch.nn.Module, source, hf_config=None) -> str:
    """Load this rank's weights from ``source`` (see ``rank_state``) into ``model``; returns the source's kind."""
    state, kind = rank_state(source, hf_config)
    load_state(model, state, "HF state" if kind == "hf-state" else str(source))
    return kind


def nonfinite(model: torch.nn.Module) -> list[str]:
    """The names of this rank's weights holding NaN or inf (empty when all are finite)."""
    return [k for k, v in model.state_dict().items()
            if mapping.is_weight_name(k) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_weights(model: torch.nn.Module, out: str | os.PathLike, hf_dir: str | os.PathLike) -> None:
    """This rank's shard as ``out/mp_rank_TT_PPP/model.safetensors`` in the model's own spelling; DP rank 0 of each
    model-parallel rank writes, global rank 0 adds ``tr1_mcore.json`` and ``hf/`` (config, tokenizer from
    ``hf_dir``). Collective-free."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    out = Path(out)
    tp_rank, tp, pp_rank, pp = _rank_info()
    names = [k for k in model.state_dict() if mapping.is_weight_name(k)]
    if ps.get_data_parallel_rank() == 0:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if mapping.is_weight_name(k)}
        folder = out / rank_dir(tp_rank, pp_rank)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / WEIGHTS_FILE))
        integrity.write_checksum(folder / WEIGHTS_FILE)
    if not dist.is_initialized() or dist.get_rank() == 0:
        copy_hf_side_files(hf_dir, out / HF_SUBDIR)
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        dims = mapping.Dims.from_hf_config(hf_config)
        dtype = str(next(iter(model.state_dict().values())).dtype).removeprefix("torch.")
        meta = Meta(tp=tp, pp=pp, spec=model_spelling(names), num_layers=dims.layers, dtype=dtype,
                    tied_embeddings=dims.tied, files={rank_dir(t, p): [WEIGHTS_FILE] for t in range(tp)
                                                      for p in range(pp)}, checksums=integrity.ALGORITHM)
        (out / META).write_text(meta.to_json())
