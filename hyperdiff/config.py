"""Typed configuration: YAML files and CLI overrides fill the same dataclasses the code uses.

Contract: `from_dict(cls, data)` builds a (nested) dataclass from plain data, recursing into fields whose type is a
dataclass and turning lists into tuples where the field is a tuple; an unknown key is a one-line `HyperdiffError`
naming it and the fields that exist. `load_config(cls, path, overrides)` reads YAML (safe loader), then applies
dotted overrides (`{"unet.steps": 100}`); `parse_assignments(["hypernet.decoder=mlp"])` turns `--set KEY=VALUE` flags into
such overrides (values parsed as YAML scalars). `to_dict(obj)` is the inverse (JSON-friendly), written into file metadata.
Validation lives in each dataclass's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from hyperdiff.errors import HyperdiffError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise HyperdiffError(f"`{where}` has unknown key '{unknown[0]}', expected one of {sorted(types)}")
    kwargs = {}
    for name, value in data.items():
        ftype = types[name]
        if dataclasses.is_dataclass(ftype) and isinstance(value, Mapping):
            value = from_dict(ftype, value, f"{where}.{name}")
        elif typing.get_origin(ftype) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise HyperdiffError(f"`{where}` is invalid: {e}") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):  # a nested config with its own `to_dict` says how it is written
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {k: v.to_dict() if dataclasses.is_dataclass(v) and hasattr(v, "to_dict") else to_dict(v)
                for k, v in values.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HyperdiffError(f"override '{key}' goes through '{part}', which is not a section")
    node[parts[-1]] = value


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=mlp"]` → `{"a.b": 1, "c": "mlp"}`; each value is read as YAML (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise HyperdiffError(f"`--set` must be KEY=VALUE with a dotted config key, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise HyperdiffError(f"`--set` value of '{key}' is not a YAML value, got {text!r}") from None
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string; a number is meant
            try:
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HyperdiffError(f"`--config` file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise HyperdiffError(f"`--config` file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise HyperdiffError(f"`--config` file '{path}' must hold a mapping, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    return from_dict(cls, data, where=str(path) if path else "config")
