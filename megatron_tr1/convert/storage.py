"""File plumbing shared by both conversion directions: a lazy reader of HF safetensors directories, a
size-bounded safetensors writer, copying the non-weight HF files, and atomic output directories.

Safetensors files cannot be appended to, so :class:`ChunkedWriter` buffers tensors up to ``max_bytes`` and
then writes one file; the files get the ``save_pretrained`` names (``model.safetensors`` when there is one,
else ``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``). Peak memory is one buffer
(at most ``max_bytes``, or one tensor larger than that, which is written at once) plus the tensors being
converted, never the model. :class:`SafetensorsDir` returns tensors backed by a mapping of the file: their
pages are read (and count in RSS) only as they are used, and are released when the tensor is dropped.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
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
        """A fresh handle. A tensor it returns stays backed by the file's mapping (pages are read as they are used)
        and the mapping goes with the tensor, so RSS stays bounded by the tensors alive."""
        try:
            return safe_open(str(self.path / f), framework="pt")
        except MemoryError as e:  # mmap refused: an address-space limit, not the file
            size = (self.path / f).stat().st_size / 2**30
            raise CheckpointError(f"{self.path / f}: cannot map this {size:.1f} GiB file ({e}); safetensors maps "
                                  "whole weight files, so an address-space limit (ulimit -v) must exceed the largest "
                                  "one plus ~1 GiB: raise it, or cap resident memory instead") from None
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
    """Writes tensors into ``directory`` as safetensors files of at most ``max_bytes`` each (a tensor larger
    than that gets a file of its own).

    It holds at most ``max_bytes`` of tensors between calls: a file is written as soon as the next tensor would
    not fit (:meth:`make_room`, which a caller may also call before materializing that tensor, so the buffer is
    written out first rather than held alongside it) and a tensor larger than ``max_bytes`` is written at once.
    """

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
        self.make_room(nbytes)
        self._buffer[name] = tensor.contiguous()
        self._buffered += nbytes
        self.total_bytes += nbytes
        if self._buffered > self.max_bytes:  # only a tensor alone larger than the limit: no need to keep it
            self.flush()

    def make_room(self, nbytes: int) -> None:
        """Write the buffered tensors out if a tensor of ``nbytes`` would not fit next to them."""
        if self._buffer and self._buffered + nbytes > self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, str(self.dir / f"chunk-{len(self._chunks):05d}.tmp"), metadata=self.metadata)
        self._chunks.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0
        _release_freed_memory()

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


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand the heap memory of a written buffer back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc serves allocations below its mmap threshold (which grows up to 32 MiB: most tensors) from its heap and
    keeps them there when freed; the next tensor too large for the holes (an embedding) is then mapped on top of
    the freed buffer, adding up to a buffer's worth of RSS (measured: up to 610 MiB, Qwen2.5-VL-3B
    mcore-to-hf at 512 MiB shards).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
def atomic_dir(out: str | os.PathLike, force: bool, source: str | os.PathLike) -> Iterator[Path]:
    """Yield ``OUT.tmp-<pid>`` to write into; on success it replaces ``out``, on error it is removed.

    An existing non-empty ``out`` is refused unless ``force``; an ``out`` that is the input folder ``source`` or
    contains it is refused whatever ``force`` says (replacing it would delete the input).
    """
    out = Path(out)
    src, dst = Path(source).resolve(), out.resolve()
    if dst == src or dst in src.parents:
        what = "is the input folder" if dst == src else f"contains the input folder {source}"
        raise CheckpointError(f"{out}: --out {what}; writing there would delete the input (even with --force): "
                              "choose another --out")
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
