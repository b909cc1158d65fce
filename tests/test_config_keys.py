"""Every config key a message or docstring names (``section.field``, e.g. ``rollout.sync_bucket_bytes``) is a real,
settable key of ``TrainConfig``: a user told to set ``model.layer_spec`` can set it."""
import ast
import dataclasses
import re
import typing
from pathlib import Path

from megatron_tr1.rl.config import TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_tr1"
SECTIONS = [f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.type) or
            dataclasses.is_dataclass(typing.get_type_hints(TrainConfig)[f.name])]
KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")((?:\.[A-Za-z_]\w*)+)")
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "yaml", "yml", "py", "pt", "md", "png", "sh", "tmp", "sha256"}
HF_NAME_TABLE = ("convert/mapping.py", "convert/mapping_layers.py")  # HF tensor names ("model.layers.N...") are not
# config keys


def resolves(path: list[str]) -> bool:
    """Whether ``path`` names a field of TrainConfig (nested dataclasses walked to the end)."""
    cls = TrainConfig
    for part in path:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return part == path[-1] and callable(getattr(cls, part, None))  # a method, e.g. algorithm.reward_name
        tp = hints[part]
        cls = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if cls is None and part != path[-1]:
            return False
    return True


def is_module(path: list[str]) -> bool:
    """A dotted module reference such as ``data.video.sample_frames`` or ``rollout.engine``."""
    for n in range(len(path), 0, -1):
        base = PACKAGE.joinpath(*path[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def named_keys():
    for path in sorted(PACKAGE.rglob("*.py")):
        if str(path.relative_to(PACKAGE)) in HF_NAME_TABLE:
            continue
        for line, text in strings(path):
            for m in KEY.finditer(text):
                parts = [m.group(1)] + m.group(2).lstrip(".").split(".")
                if parts[-1] in FILE_SUFFIXES or text[m.end():m.end() + 1] == "*":  # files, field patterns
                    continue
                yield f"{path.relative_to(PACKAGE)}:{line}", parts


def test_every_named_key_exists():
    found = list(named_keys())
    bad = sorted({f"{where} {'.'.join(p)}" for where, p in found if not resolves(p) and not is_module(p)})
    assert not bad, "\n".join(bad)
    assert len(found) > 50  # the scan sees the package's messages


def test_the_scan_catches_a_missing_key():
    assert resolves(["rollout", "sync_bucket_bytes"]) and resolves(["model", "layer_spec"])
    assert resolves(["data", "video", "max_frames"]) and resolves(["stages", "grpo", "steps"])
    assert not resolves(["model", "sequence_parallel"]) and not resolves(["parallel", "tensor_parallel"])
    assert not is_module(["model", "sequence_parallel"]) and is_module(["rollout", "engine", "build_prompt"])
