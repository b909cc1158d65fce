"""The tr1 Megatron checkpoint (per-rank shards) and loading it at any TP x PP layout.

Layout of a checkpoint directory ``OUT``::

    OUT/tr1_mcore.json                         format, version, tp, pp, spec, layers, dtype, tied, files, checksums
    OUT/mp_rank_{tp:02d}_{pp:03d}/model.safetensors   that rank's Megatron state dict (or model-0000k-of-N
                                               .safetensors + index when larger than the shard size), each with
                                               its ``.sha256`` when ``checksums`` is "sha256" (``convert.integrity``)
    OUT/hf/                                    config.json, generation config, tokenizer, processor files

``load_mcore_state`` returns one rank's state dict; when the stored TP/PP differ from the requested ones it
merges the stored shards into HF tensors and splits them again, both through ``mapping``. Every file is checked
against its checksum before its first tensor is read (when the checkpoint has them), and every tensor must be
finite: a corrupted or diverged checkpoint is refused with the file's name, never used.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_tr1.convert import integrity, mapping
from megatron_tr1.convert.storage import SafetensorsDir
from megatron_tr1.errors import CheckpointError

META = "tr1_mcore.json"
# a training checkpoint (rl.checkpoint): RUN/checkpoints/<stage>/step_N holds these beside its model/ folder
TRAIN_MARKER, TRAIN_STATE = "COMPLETE", "trainer_state.json"
FORMAT, VERSION = "tr1_mcore", 1
HF_SUBDIR = "hf"


def rank_dir(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


@dataclass(frozen=True)
class Meta:
    """The contents of ``tr1_mcore.json``."""

    tp: int
    pp: int
    spec: str
    num_layers: int
    dtype: str
    tied_embeddings: bool
    files: dict[str, list[str]]  # rank dir -> safetensors file names
    checksums: str = ""  # "sha256": every file has a .sha256 sidecar (older checkpoints: none)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **self.__dict__}, indent=2) + "\n"


def read_meta(mcore_dir: str | os.PathLike) -> Meta:
    """Read and check ``tr1_mcore.json`` (CheckpointError naming the file and field when it is wrong)."""
    path = Path(mcore_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; pass a directory written by `tr1 convert hf-to-mcore`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"{path}: format={raw.get('format')!r} version={raw.get('version')!r}, expected "
                              f"{FORMAT!r} version {VERSION}; re-convert with this version of tr1")
    optional = {"checksums"}
    missing = [k for k in Meta.__dataclass_fields__ if k not in raw and k not in optional]
    if missing:
        raise CheckpointError(f"{path}: field {missing[0]!r} is missing; re-convert the checkpoint")
    return Meta(**{k: raw[k] for k in Meta.__dataclass_fields__ if k in raw})


def read_dims(mcore_dir: str | os.PathLike, meta: Meta) -> mapping.Dims:
    """The model sizes from ``OUT/hf/config.json``, checked against ``tr1_mcore.json``."""
    cfg_path = Path(mcore_dir) / HF_SUBDIR / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found; the checkpoint is incomplete, re-convert it")
    d = mapping.Dims.from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path))
    if (d.layers, d.tied) != (meta.num_layers, meta.tied_embeddings):
        raise CheckpointError(f"config mismatch: {cfg_path} has num_hidden_layers={d.layers}, tie_word_embeddings="
                              f"{d.tied} but {Path(mcore_dir) / META} has num_layers={meta.num_layers}, "
                              f"tied_embeddings={meta.tied_embeddings}; re-convert the checkpoint")
    return d


class MCoreReader:
    """Lazy access to the shards of a tr1 Megatron checkpoint, by rank and local-spelling name."""

    def __init__(self, mcore_dir: str | os.PathLike):
        self.dir = Path(mcore_dir)
        self.meta = read_meta(self.dir)
        self.dims = read_dims(self.dir, self.meta)
        self.dims.validate(self.meta.tp, self.meta.pp)
        self._ranks: dict[tuple[int, int], tuple[SafetensorsDir, dict[str, str]]] = {}

    def _rank(self, tp_rank: int, pp_rank: int) -> tuple[SafetensorsDir, dict[str, str]]:
        """The rank's files and its local-name -> stored-name map, checked for missing/unexpected tensors."""
        if (tp_rank, pp_rank) not in self._ranks:
            name = rank_dir(tp_rank, pp_rank)
            if name not in self.meta.files:
                raise CheckpointError(f"{self.dir / META}: no files listed for {name}; re-convert the checkpoint")
            if self.meta.checksums:
                for f in self.meta.files[name]:
                    integrity.verify_checksum(self.dir / name / f)
            files = SafetensorsDir(self.dir / name, self.meta.files[name])
            local = {mapping.mcore_local_name(k): k for k in files if mapping.is_weight_name(k)}
            stage = mapping.params(self.dims, pp_rank, self.meta.pp)
            mapping.check_rank_names(local, stage, str(self.dir / name))
            self._ranks[tp_rank, pp_rank] = (files, local)
        return self._ranks[tp_rank, pp_rank]

    def check_all(self) -> None:
        """Open every rank's files and check their tensor names (headers only), before any long work starts."""
        for pp_rank in range(self.meta.pp):
            for tp_rank in range(self.meta.tp):
                self._rank(tp_rank, pp_rank)

    def shard(self, tp_rank: int, pp_rank: int, p: mapping.Param) -> torch.Tensor:
        """The stored TP shard of ``p`` on rank (tp_rank, pp_rank), shape-checked against the config."""
        files, local = self._rank(tp_rank, pp_rank)
        t = files[local[p.mcore]]
        want = p.expected_shard_shape(self.meta.tp)
        if tuple(t.shape) != want:
            raise CheckpointError(f"config mismatch: {files.file_of(local[p.mcore])} tensor {local[p.mcore]} has "
                                  f"shape {tuple(t.shape)} but {self.dims.source} at tp={self.meta.tp} implies {want}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{files.file_of(local[p.mcore])}: tensor {local[p.mcore]} holds NaN or inf "
                                  f"values; the run had diverged when it was saved: use an earlier checkpoint")
        return t

    def hf_tensors(self, pp_rank: int, p: mapping.Param) -> dict[str, torch.Tensor]:
        """The HF tensors of stored Param ``p`` of stage ``pp_rank``, merged from all TP ranks."""
        return mapping.merge(p, [self.shard(t, pp_rank, p) for t in range(self.meta.tp)])

    def load(self, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, spec: str = "local"
             ) -> dict[str, torch.Tensor]:
        """The state dict of rank (tp_rank, pp_rank) of a TP=tp_size x PP=pp_size model."""
        if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
            raise CheckpointError(f"rank tp={tp_rank} pp={pp_rank} is outside TP={tp_size} x PP={pp_size}")
        self.dims.validate(tp_size, pp_size)
        wanted = mapping.params(self.dims, pp_rank, pp_size)
        if (tp_size, pp_size) == (self.meta.tp, self.meta.pp):
            return {mapping.mcore_spec_name(p.mcore, spec): self.shard(tp_rank, pp_rank, p) for p in wanted}
        stored = {p.hf: (s, p) for s, p in mapping.all_params(self.dims, self.meta.pp) if not p.embedding_copy}
        out = {}
        for p in wanted:
            s, sp = stored[p.hf]
            full = self.hf_tensors(s, sp)
            out[mapping.mcore_spec_name(p.mcore, spec)] = mapping.split(p, [full[n] for n in p.hf], tp_rank, tp_size,
                                                                        self.dims.source)
        return out


def load_mcore_state(mcore_dir: str | os.PathLike, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int,
                     spec: str = "local") -> dict[str, torch.Tensor]:
    """Rank (tp_rank, pp_rank)'s Megatron state dict from a tr1 checkpoint, resharded if stored differently.

    Names use the spelling of ``spec`` ("local" or "te"), whichever spelling the checkpoint stores.
    """
    return MCoreReader(mcore_dir).load(tp_rank, tp_size, pp_rank, pp_size, spec)
