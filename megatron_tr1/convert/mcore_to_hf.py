"""tr1 Megatron checkpoint -> HF safetensors in the ``save_pretrained`` layout, streamed one Param at a time.

Each Param's TP shards are read, merged into HF tensors by ``mapping`` and buffered into a
:class:`ChunkedWriter` (``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` plus
``model.safetensors.index.json`` above the shard size). The HF side files stored at conversion time
(config, tokenizer, processor) are copied next to them, so ``from_pretrained`` loads the result. Peak memory:
one Param's shards and HF tensors plus at most ``shard_bytes`` of buffered output (written out before the
shards of a Param that does not fit are read; an HF tensor larger than the limit is written at once).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from tqdm import tqdm

from megatron_tr1.convert import mapping
from megatron_tr1.convert.checkpoint import HF_SUBDIR, MCoreReader
from megatron_tr1.convert.hf_to_mcore import DEFAULT_SHARD_BYTES
from megatron_tr1.convert.storage import ChunkedWriter, atomic_dir, copy_hf_side_files
from megatron_tr1.models.family import require_supported


def convert_mcore_to_hf(mcore_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                        shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> list[str]:
    """Write the HF checkpoint of the tr1 Megatron checkpoint ``mcore_dir`` to ``out``; return its weight files."""
    config = Path(mcore_dir) / HF_SUBDIR / "config.json"
    if config.is_file():  # the family first (a missing one is MCoreReader's error)
        require_supported(config, str(config), "tr1 convert mcore-to-hf")
    reader = MCoreReader(mcore_dir)
    reader.check_all()
    todo = list(mapping.all_params(reader.dims, reader.meta.pp))
    with atomic_dir(out, force, mcore_dir) as tmp:
        copy_hf_side_files(reader.dir / HF_SUBDIR, tmp)
        writer = ChunkedWriter(tmp, shard_bytes)
        desc = f"mcore-to-hf tp={reader.meta.tp} pp={reader.meta.pp}"
        for pp_rank, p in tqdm(todo, desc=desc, unit="tensor", disable=not progress):
            if p.embedding_copy:
                continue
            # a full buffer is written out before the shards are read and merged, not held next to them
            writer.make_room(math.prod(p.hf_shapes[0]) * reader.shard(0, pp_rank, p).dtype.itemsize)
            tensors = reader.hf_tensors(pp_rank, p)
            for name in list(tensors):
                writer.add(name, tensors.pop(name))  # no reference left here once the writer has written it
        files = writer.close()
    return files
