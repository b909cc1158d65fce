"""File plumbing shared by both conversion directions: a lazy reader of HF safetensors directories, a
size-bounded safetensors writer, copying the non-weight HF files, and atomic output directories.

Safetensors files cannot be appended to, so :class:`ChunkedWriter` buffers tensors up to ``max_bytes`` and
then writes one file; the files get the ``save_pretrained`` names (``model.safetensors`` when there is one,
else ``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``). Peak memory is one buffer
plus the tensors being converted, never the model.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_tr1.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".index.json")


class SafetensorsDir(Mapping):
    """Read-only ``name -> tensor`` view of a directory of safetensors files, loading one tensor per access."""

    def __init__(self, path: str | os.PathLike, files: list[str] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such directory; pass the checkpoint directory")
        if files is None:
            files = self._discover()
        self._where: dict[str, str] = {}
        for f in files:
            if not (self.path / f).is_file():
                raise CheckpointError(f"{self.path / f}: listed weight file is missing; the checkpoint is incomplete")
            with self._open(f) as handle:
                for name in handle.keys():
                    self._where[name] = f

    def _discover(self) -> list[str]:
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in self.path.iterdir())) or "nothing"
            raise CheckpointError(f"{self.path}: no *.safetensors weights (found: {found}); save the model with "
                                  "save_pretrained(..., safe_serialization=True)")
        return files

    def _open(self, f: str):
        """A fresh handle: files are mapped only while a tensor is copied out, so RSS stays bounded."""
        try:
            return safe_open(str(self.path / f), framework="pt")
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{self.path / f}: not a readable safetensors file ({e})") from None

    def file_of(self, name: str) -> str:
        return str(self.path / self._where[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        with self._open(self._where[name]) as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class ChunkedWriter:
    """Writes tensors into ``directory`` as safetensors files of at most ~``max_bytes`` each."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, metadata: dict[str, str] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._chunks: list[list[str]] = []  # tensor names per written chunk
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in c for c in self._chunks):
            raise CheckpointError(f"{self.dir}: tensor {name} written twice (a mapping bug)")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + nbytes > self.max_bytes:
            self.flush()
        self._buffer[name] = tensor.contiguous()
        self._buffered += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, str(self.dir / f"chunk-{len(self._chunks):05d}.tmp"), metadata=self.metadata)
        self._chunks.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0

    def close(self) -> list[str]:
        """Flush, give the files their final names (and an index when there are several); return the names."""
        self.flush()
        n = len(self._chunks)
        names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            os.replace(self.dir / f"chunk-{k:05d}.tmp", self.dir / name)
        if n > 1:
            weight_map = {t: names[k] for k, chunk in enumerate(self._chunks) for t in chunk}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names if n else []


def copy_hf_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config, generation config, tokenizer, processor and chat-template files (everything but weights)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json; pass a directory written by save_pretrained")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield ``OUT.tmp-<pid>`` to write into; on success it replaces ``out``, on error it is removed.

    An existing non-empty ``out`` is refused unless ``force``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out}: output exists and is not empty; pass --force to replace it or choose "
                              "another --out")
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)
