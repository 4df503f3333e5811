"""Network configs as frozen dataclasses that round-trip through model.yaml mappings."""

from __future__ import annotations

import dataclasses
import typing
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A network config mapping has an unknown key or a value of the wrong type."""


def _ok(value: object, hint: object) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        (item, _) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and value and all(_ok(v, item) for v in value)
    return False


def config_from_dict(cls: type[T], data: object) -> T:
    """Build config `cls` from a mapping; ConfigError names the key that is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key {key!r}; the keys of {cls.__name__} are {names}")
        if not _ok(value, hints[key]):
            raise ConfigError(f"{key} must be of type {hints[key]}, got {value!r}")
        values[key] = tuple(value) if isinstance(value, list) else value
        if hints[key] is float:
            values[key] = float(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def config_to_dict(config: object) -> dict:
    """A config as a plain mapping (lists for tuples) for model.yaml."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
