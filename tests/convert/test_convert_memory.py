"""Memory bounds of conversion: a ChunkedWriter holds at most its limit, a tensor larger than the limit is written
at once, and the converters keep no reference to a written tensor and make room before reading the next Param."""
from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from safetensors.torch import load_file

from megatron_tr1.convert import mapping, storage
from megatron_tr1.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_tr1.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_tr1.convert.storage import ChunkedWriter
from megatron_tr1.errors import CheckpointError


def _t(nbytes: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((nbytes // 4,), fill, dtype=torch.float32)


def test_a_tensor_larger_than_the_limit_is_written_at_once_and_not_held(tmp_path):
    w = ChunkedWriter(tmp_path, max_bytes=100)
    w.add("small", _t(40, 1.0))
    big = _t(400, 2.0)
    ref = weakref.ref(big)
    w.add("big", big)
    del big
    assert ref() is None  # written (with the small one before it, in its own file) and dropped
    assert len(list(tmp_path.glob("chunk-*.tmp"))) == 2


def test_the_writer_never_holds_more_than_its_limit(tmp_path):
    w = ChunkedWriter(tmp_path, max_bytes=100)
    held = []
    for i, n in enumerate([60, 32, 148, 8, 100, 20, 400, 8, 92]):
        t = _t(n, float(i))
        held.append((weakref.ref(t), n))
        w.add(f"t{i}", t)
        del t
        assert sum(n for r, n in held if r() is not None) <= 100, i
    names = w.close()
    # files are cut exactly as before: a file is closed when the next tensor does not fit
    index = json.loads((tmp_path / storage.INDEX).read_text())
    chunks = [sorted(k for k, f in index["weight_map"].items() if f == name) for name in names]
    assert chunks == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"], ["t6"], ["t7", "t8"]]
    assert names[0] == "model-00001-of-00007.safetensors" and index["metadata"]["total_size"] == 868
    assert torch.equal(load_file(tmp_path / names[5])["t6"], _t(400, 6.0))


def test_make_room_writes_the_buffer_out_only_when_the_next_tensor_would_not_fit(tmp_path):
    w = ChunkedWriter(tmp_path, max_bytes=100)
    t = _t(60)
    ref = weakref.ref(t)
    w.add("a", t)
    del t
    w.make_room(40)
    assert ref() is not None  # still fits: kept
    w.make_room(41)
    assert ref() is None and w.close() == ["model.safetensors"]


def test_the_memory_of_a_written_buffer_is_handed_back_to_the_os(tmp_path, monkeypatch):
    storage._release_freed_memory()  # glibc's malloc_trim, or nothing
    calls = []
    monkeypatch.setattr(storage, "_release_freed_memory", lambda: calls.append("trim"))
    w = ChunkedWriter(tmp_path, max_bytes=100)
    w.add("a", _t(60))
    assert calls == []
    w.add("b", _t(60))
    assert calls == ["trim"]


def test_an_address_space_limit_too_low_to_map_a_weight_file_is_named(tmp_path, monkeypatch):
    w = ChunkedWriter(tmp_path, max_bytes=100)
    w.add("a", _t(8))
    w.close()

    def refuse(*args, **kwargs):
        raise MemoryError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr(storage, "safe_open", refuse)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot map .*address-space limit \(ulimit -v\)"):
        storage.SafetensorsDir(tmp_path)


class _Ledger:
    """Weak references to every tensor handed to a ChunkedWriter and to every tensor written to a file."""

    def __init__(self, monkeypatch):
        self.handed: list[tuple[ChunkedWriter, weakref.ref, int]] = []
        self.written: list[weakref.ref] = []
        add, save_file = ChunkedWriter.add, storage.save_file

        def recording_add(writer, name, tensor):
            self.handed.append((writer, weakref.ref(tensor), tensor.numel() * tensor.element_size()))
            add(writer, name, tensor)

        def recording_save_file(tensors, *args, **kwargs):
            self.written += [weakref.ref(t) for t in tensors.values()]
            save_file(tensors, *args, **kwargs)

        monkeypatch.setattr(ChunkedWriter, "add", recording_add)
        monkeypatch.setattr(storage, "save_file", recording_save_file)

    def check(self, nbytes: int) -> None:
        """Nothing written is still referenced; each writer holds at most its limit and, when it holds anything,
        has room for a next tensor of ``nbytes``."""
        written = [r() for r in self.written if r() is not None]
        assert not written, f"{len(written)} written tensor(s) still referenced"
        for writer in {w for w, _, _ in self.handed}:
            held = sum(n for w, r, n in self.handed if w is writer and r() is not None)
            assert held <= writer.max_bytes and (held == 0 or held + nbytes <= writer.max_bytes), (held, nbytes)


@pytest.mark.parametrize("tp", [1, 2])
def test_converters_hold_at_most_the_shard_size_next_to_the_param_being_converted(hf_dir, tmp_path, monkeypatch,
                                                                                  tp):
    ledger = _Ledger(monkeypatch)
    split, merge = mapping.split, mapping.merge
    calls = []

    def checked_split(p, hf_tensors, tp_rank, tp_size, source="config.json"):
        if tp_rank == 0:  # before the first shard of a Param is made, every writer has room for it
            ledger.check(math.prod(p.expected_shard_shape(tp_size)) * hf_tensors[0].element_size())
            calls.append(p.mcore)
        return split(p, hf_tensors, tp_rank, tp_size, source)

    def checked_merge(p, shards):
        ledger.check(math.prod(p.hf_shapes[0]) * shards[0].element_size())
        calls.append(p.mcore)
        return merge(p, shards)

    monkeypatch.setattr(mapping, "split", checked_split)
    monkeypatch.setattr(mapping, "merge", checked_merge)
    # the largest tensors (256 KiB) are larger than a writer's limit: written at once
    convert_hf_to_mcore(hf_dir(), tmp_path / "mc", tp=tp, pp=1, shard_bytes=200_000, progress=False)
    ledger.check(0)
    convert_mcore_to_hf(tmp_path / "mc", tmp_path / "hf", shard_bytes=200_000, progress=False)
    ledger.check(0)
    assert len(calls) == 2 * len(mapping.params(mapping.Dims.from_hf_config(
        json.loads((hf_dir() / "config.json").read_text())), 0, 1))
    original = {k: v for f in sorted(hf_dir().glob("*.safetensors")) for k, v in load_file(f).items()}
    back = {k: v for f in sorted((tmp_path / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
