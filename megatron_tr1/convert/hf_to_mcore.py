"""HF Qwen2.5-VL safetensors -> tr1 Megatron checkpoint (per-rank shards), streamed one Param at a time.

For each Param of the mapping (stage by stage) the HF tensors are read once, split for every TP rank and
handed to that rank's :class:`ChunkedWriter` (each buffers at most ``shard_bytes // tp``); a stage's writers
are closed before the next stage starts. Peak memory: one Param's HF tensors and shards plus at most
``shard_bytes`` of buffered output (a writer that has no room for the Param's shard is written out before the
HF tensors are read; a shard larger than the limit is written at once).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_tr1.convert import integrity, mapping
from megatron_tr1.convert.checkpoint import HF_SUBDIR, META, Meta, rank_dir
from megatron_tr1.convert.storage import ChunkedWriter, SafetensorsDir, atomic_dir, copy_hf_side_files
from megatron_tr1.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Peak RSS is about the import baseline + the largest tensor + max(shard size, largest tensor): 1 GiB keeps
# Qwen2.5-VL-7B (1.02 GiB embedding) at that floor; larger files would only cost memory.
DEFAULT_SHARD_BYTES = 1 << 30


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
    d = mapping.Dims.from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path),
                                    command="tr1 convert hf-to-mcore")
    d.validate(tp, pp)
    source = SafetensorsDir(hf_dir)
    get = mapping.hf_getter(source, d, None, pp, source=str(hf_dir))
    cast = DTYPES.get(dtype)
    stored_dtypes: set[torch.dtype] = set()
    files: dict[str, list[str]] = {}
    todo = list(mapping.all_params(d, pp))
    with atomic_dir(out, force, hf_dir) as tmp:
        copy_hf_side_files(hf_dir, tmp / HF_SUBDIR)
        writers: dict[int, ChunkedWriter] = {}
        stage = -1
        for pp_rank, p in tqdm(todo, desc=f"hf-to-mcore tp={tp} pp={pp}", unit="tensor", disable=not progress):
            if pp_rank != stage:
                _close(writers, stage, files)
                stage = pp_rank
                writers = {t: ChunkedWriter(tmp / rank_dir(t, pp_rank), shard_bytes // tp) for t in range(tp)}
            hf_tensors = [get(n) for n in p.hf]  # mapped from the files: read only by split
            dtype = cast or functools.reduce(torch.promote_types, (x.dtype for x in hf_tensors))
            for w in writers.values():  # write out full buffers before the HF tensors and shards are in memory
                w.make_room(math.prod(p.expected_shard_shape(tp)) * dtype.itemsize)
            name = mapping.mcore_spec_name(p.mcore, spec)
            for t in range(tp):
                shard = mapping.split(p, hf_tensors, t, tp, d.source)
                shard = shard if cast is None else shard.to(cast)
                stored_dtypes.add(shard.dtype)
                writers[t].add(name, shard)
                del shard  # the writer holds it, or has written it already
            del hf_tensors
        _close(writers, stage, files)
        dtype_name = _dtype_name(stored_dtypes.pop()) if len(stored_dtypes) == 1 else "mixed"
        meta = Meta(tp=tp, pp=pp, spec=spec, num_layers=d.layers, dtype=dtype_name, tied_embeddings=d.tied,
                    files=files, checksums=integrity.ALGORITHM)
        (tmp / META).write_text(meta.to_json())
    return meta


def _close(writers: dict[int, ChunkedWriter], pp_rank: int, files: dict[str, list[str]]) -> None:
    for t, w in writers.items():
        files[rank_dir(t, pp_rank)] = names = w.close()
        for name in names:  # like the trainer's checkpoints: a SHA-256 beside each file, checked on load
            integrity.write_checksum(w.dir / name)
