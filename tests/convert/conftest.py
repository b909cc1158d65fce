"""Tiny random HF Qwen2.5-VL checkpoints on disk, built once per test session and shared (read-only)."""
from __future__ import annotations

import pytest

from megatron_tr1.demo import tiny_hf_model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """``hf_dir(tied=False, groups=2)`` -> a ``save_pretrained`` directory of that tiny model (cached)."""
    cache = {}

    def make(tied: bool = False, groups: int = 2):
        if (tied, groups) not in cache:
            path = tmp_path_factory.mktemp(f"hf_tied{int(tied)}_g{groups}")
            tiny_hf_model(seed=groups + 10 * tied, tie_word_embeddings=tied,
                          num_key_value_heads=groups).save_pretrained(path)
            cache[tied, groups] = path
        return cache[tied, groups]

    return make
