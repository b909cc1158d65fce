"""HF Qwen2.5-VL safetensors -> tr1 Megatron checkpoint (per-rank shards), streamed one Param at a time.

For each Param of the mapping (stage by stage) the HF tensors are read once, split for every TP rank and
handed to that rank's :class:`ChunkedWriter`; a stage's writers are closed before the next stage starts. Peak
memory: one Param's HF tensors and shards plus at most ``shard_bytes`` of buffered output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_tr1.convert import mapping
from megatron_tr1.convert.checkpoint import HF_SUBDIR, META, Meta, rank_dir
from megatron_tr1.convert.storage import ChunkedWriter, SafetensorsDir, atomic_dir, copy_hf_side_files
from megatron_tr1.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 2 << 30


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def convert_hf_to_mcore(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int, pp: int,
                        dtype: str | None = None, spec: str = "local", force: bool = False,
                        shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Meta:
    """Convert the HF checkpoint in ``hf_dir`` into a TP x PP tr1 Megatron checkpoint at ``out``.

    ``dtype`` casts every tensor (default: keep the stored dtypes); ``spec`` picks the name spelling of
    the fused-norm weights ("local" or "te").
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if spec not in mapping.SPECS:
        raise ConfigError(f"--spec {spec}: choose one of {', '.join(mapping.SPECS)}")
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found; --hf-dir must be a directory written by save_pretrained")
    d = mapping.Dims.from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path))
    d.validate(tp, pp)
    source = SafetensorsDir(hf_dir)
    get = mapping.hf_getter(source, d, None, pp, source=str(hf_dir))
    cast = DTYPES.get(dtype)
    stored_dtypes: set[torch.dtype] = set()
    files: dict[str, list[str]] = {}
    todo = list(mapping.all_params(d, pp))
    with atomic_dir(out, force) as tmp:
        copy_hf_side_files(hf_dir, tmp / HF_SUBDIR)
        writers: dict[int, ChunkedWriter] = {}
        stage = -1
        for pp_rank, p in tqdm(todo, desc=f"hf-to-mcore tp={tp} pp={pp}", unit="tensor", disable=not progress):
            if pp_rank != stage:
                _close(writers, stage, files)
                stage = pp_rank
                writers = {t: ChunkedWriter(tmp / rank_dir(t, pp_rank), shard_bytes // tp) for t in range(tp)}
            hf_tensors = [get(n) for n in p.hf]
            for t in range(tp):
                shard = mapping.split(p, hf_tensors, t, tp, d.source)
                shard = shard if cast is None else shard.to(cast)
                stored_dtypes.add(shard.dtype)
                writers[t].add(mapping.mcore_spec_name(p.mcore, spec), shard)
        _close(writers, stage, files)
        dtype_name = _dtype_name(stored_dtypes.pop()) if len(stored_dtypes) == 1 else "mixed"
        meta = Meta(tp=tp, pp=pp, spec=spec, num_layers=d.layers, dtype=dtype_name, tied_embeddings=d.tied,
                    files=files)
        (tmp / META).write_text(meta.to_json())
    return meta


def _close(writers: dict[int, ChunkedWriter], pp_rank: int, files: dict[str, list[str]]) -> None:
    for t, w in writers.items():
        files[rank_dir(t, pp_rank)] = w.close()
