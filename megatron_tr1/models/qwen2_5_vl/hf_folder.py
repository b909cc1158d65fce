"""An HF Qwen2.5-VL folder (``save_pretrained`` layout): its config and tokenizer, checked before anything is built."""
from __future__ import annotations

from pathlib import Path

from megatron_tr1.errors import ConfigError


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
