"""Backend options from keyword arguments: one frozen dataclass per backend, one way to parse it."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

from engine.errors import EngineError

OptionsT = TypeVar("OptionsT")


def enum_fields(cls: type) -> dict[str, type[Enum]]:
    """Fields typed with an Enum (or an optional Enum): their values may be given by name."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        enums = [c for c in candidates if isinstance(c, type) and issubclass(c, Enum)]
        if enums:
            found[name] = enums[0]
    return found


def parse_backend_options(cls: type[OptionsT], options: Mapping[str, Any], backend: str) -> OptionsT:
    """cls(**options) with enum values given by value ("bf16"), or a one-line EngineError listing
    the valid option names and enum values."""
    enums = enum_fields(cls)
    try:
        fields = {
            name: enums[name](value) if name in enums and value is not None else value
            for name, value in options.items()
        }
        return cls(**fields)
    except (TypeError, ValueError) as error:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        choices = "".join(
            f"; {name}: {', '.join(str(e.value) for e in enum)}" for name, enum in enums.items()
        )
        raise EngineError(
            f"bad {backend} backend options {dict(options)} ({error}); valid: {valid}{choices}"
        ) from None
