"""Config = dataclasses, loaded from YAML and overridden from the command line.

Every config in the project is a (nested) dataclass. ``load_config(Cls, path, overrides)`` reads a YAML file
(optional: the dataclass defaults are the embedded default), applies ``key.sub=value`` overrides (values are
parsed as YAML scalars/lists, so ``lr=1e-6``, ``data.datasets=[...]`` and ``think=false`` all work) and builds
the dataclass tree. Unknown keys are an error that names the key and the file; wrong types name the field, and so
do non-finite numbers (``nan``, ``inf``) in a float field. A section given in part (in the file or by overrides)
starts from that section's default (the default instance of the containing dataclass, e.g. ``stages.sft``'s own
steps and learning rate), so a file and the equivalent overrides give the same config. An error in a value that
came from an override names the override (``override 'optim.lr=nan': ...``), not the file.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


from megatron_tr1.errors import ConfigError

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "apply_overrides", "load_yaml", "save_config"]


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str, default: Any = None, origins: dict | None = None,
            path: tuple[str, ...] = ()) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (dataclass, list, Optional, scalar). A mapping for a
    dataclass is filled in from ``default`` (that field's default instance) where it has no key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where, default, origins, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where, defaults=default if isinstance(default, tp) else None,
                         origins=origins, path=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is Any:
        return value
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # YAML 1.1 reads "1e-6" as a string
        except (ValueError, OverflowError):
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {value!r} is not a finite number; give a finite value")
            return number
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config", defaults: Any = None,
              origins: dict[tuple[str, ...], str] | None = None, path: tuple[str, ...] = ()) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ConfigError`` naming them.

    Keys missing from ``data`` take their value from ``defaults`` (an instance of ``cls``: the default of the field
    this mapping fills) or else the class defaults; a nested mapping likewise starts from its field's default.
    ``origins`` maps the key paths set by command-line overrides (relative to ``path``, where ``data`` sits in
    the whole config) to the override's text, so that errors in those values name the override, not ``where``.
    """
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(u) for u in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for k, v in data.items():
        sub = path + (k,)
        default = _field_default(fields[k], defaults) if isinstance(v, dict) else None
        kwargs[k] = _coerce(v, types_[k], _override_where(origins, sub) or f"{where}.{k}", default, origins, sub)
    if defaults is not None:
        for name, f in fields.items():
            if name not in kwargs and f.init:
                kwargs[name] = getattr(defaults, name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ConfigError(f"{_blame(where, str(e), origins, path)}: {e}") from e


def _field_default(f: dataclasses.Field, defaults: Any) -> Any:
    """The default value of field ``f``: from the containing section's default instance, else its own default."""
    if defaults is not None:
        return getattr(defaults, f.name, None)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _override_where(origins: dict | None, path: tuple[str, ...]) -> str | None:
    """``override 'a.b=v': a.b`` when an override set ``path`` (or a section above it), else None."""
    for n in range(len(path), 0, -1):
        text = (origins or {}).get(path[:n])
        if text is not None:
            return f"override {text!r}: {'.'.join(path)}"
    return None


def _blame(where: str, message: str, origins: dict | None, path: tuple[str, ...]) -> str:
    """Where a check of the section at ``path`` failed: the override(s) whose keys ``message`` names, else
    ``where`` (the file), noting the overrides that touched the section."""
    if not origins or _override_where(origins, path):
        return where
    inside = [(p, text) for p, text in origins.items() if p[: len(path)] == path and len(p) > len(path)]
    named = [text for p, text in inside
             if re.search(rf"(?<![\w.]){re.escape('.'.join(p[len(path):]))}(?!\w)", message)]
    if named:
        return f"override {', '.join(repr(t) for t in named)}" + (f": {'.'.join(path)}" if path else "")
    if inside:
        return f"{where} (with override {', '.join(repr(t) for _, t in inside)})"
    return where


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], cls: type, origins: dict | None = None) -> dict:
    """Apply ``a.b=value`` overrides onto a raw mapping, checking each key path against ``cls``. ``origins``, when
    given, records each overridden key path -> the override's text (for ``from_dict``'s error messages)."""
    for text in overrides:
        path, value = parse_override(text)
        if origins is not None:
            for p in [p for p in origins if p[: len(path)] == tuple(path)]:
                del origins[p]  # a whole section replaced: earlier overrides inside it are gone
            origins[tuple(path)] = text
        node, node_cls = data, cls
        for i, part in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)} if dataclasses.is_dataclass(node_cls) else None
            if fields is not None and part not in fields:
                raise ConfigError(
                    f"override {text!r}: unknown key {'.'.join(path[: i + 1])!r}; "
                    f"valid keys here: {', '.join(sorted(fields))}"
                )
            if i == len(path) - 1:
                node[part] = value
                break
            sub_tp = _field_types(node_cls)[part] if fields is not None else Any
            sub_tp = next((a for a in typing.get_args(sub_tp) if dataclasses.is_dataclass(a)), sub_tp)
            if not isinstance(node.get(part), dict):
                default = getattr(node_cls(), part, None) if _all_defaulted(node_cls) else None
                node[part] = to_dict(default) if dataclasses.is_dataclass(default) else {}
            node, node_cls = node[part], sub_tp
    return data


def _all_defaulted(cls) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def load_yaml(path: str | Path) -> dict:
    if not str(path).strip():
        raise ConfigError("the config file path is empty; give the path of a YAML file")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); give a YAML config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass defaults <- YAML file (if any) <- ``key.sub=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    origins: dict[tuple[str, ...], str] = {}
    data = apply_overrides(data, list(overrides or []), cls, origins)
    return from_dict(cls, data, where=str(path) if path is not None else "config", origins=origins)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
