"""Nested trial configs: {"workload", "seed", "attn": {...}, "model": {...}, "train": {...}, "data": {...}}.

Sections are frozen dataclasses built from dicts; an unknown key or a bad value fails with the
section-qualified field name (`train.lr`), the value and what is allowed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from attention.config import ConfigError, unknown_names


def section_from_dict(cls: type, values: Mapping[str, Any] | None, section: str):
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise unknown_names(section, unknown, names)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from e


def require(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: got {value!r}, allowed: {allowed}")


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge: `override` wins, sections merge field by field."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(value, Mapping) and isinstance(old, Mapping) else value
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"attn": {"k": 8}} -> {"attn.k": 8}: MLflow params and table columns."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
