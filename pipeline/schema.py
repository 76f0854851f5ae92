"""Typed dataclasses from plain dicts (parsed YAML), refusing anything unexpected.

Each config section is a frozen dataclass whose field types say what is allowed. ``from_dict``
walks the data against those types and refuses unknown keys and wrong types with the key's full
path (``outputs.video.crf: expected int, got str 'high'``), so a typo fails at load time rather
than hours into a run. Supported field types: bool, int, float, str, Path, Enum (by value or
name), ``X | None``, ``tuple[X, ...]``, ``list[X]``, and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names its key path."""


def load_yaml(cls: type[T], path: Path, missing: str) -> T:
    """Dataclass ``cls`` from the YAML file ``path``; every error names the file (and the line or
    key path). ``missing``: the message when the file does not exist."""
    import yaml

    if not path.is_file():
        raise ConfigError(missing)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; ``path`` prefixes key names in error messages."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(path, str(unknown[0]))
        raise ConfigError(f"{key}: unknown key (allowed: {', '.join(sorted(fields))})")
    kwargs = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default is missing
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    except ValueError as exc:  # the dataclass's own validation
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """The inverse of ``from_dict``: plain, YAML/JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for option in options:
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or (isinstance(value, str) and value.upper() == member.name):
                return member
        allowed = ", ".join(repr(m.value) for m in tp)
        raise ConfigError(f"{path}: expected one of {allowed}, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # stream ids like 0 are written without quotes
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
    else:
        raise TypeError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
