"""Helpers shared by the frozen-dataclass configs (UNetConfig, ScheduleConfig, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from pdjax.errors import ConfigError

C = TypeVar("C")


def from_dict_strict(cls: type[C], d: Mapping[str, Any], what: str) -> C:
    """``cls(**d)``; unknown keys raise ConfigError naming them and the valid ones; missing keys take defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise ConfigError(f"unknown {what} key(s) {', '.join(extra)}; valid: {', '.join(sorted(names))}")
    return cls(**dict(d))
