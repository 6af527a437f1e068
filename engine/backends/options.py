"""Backend options: one vocabulary (device, cuda_graph, precision), one frozen dataclass per backend, one
way to parse it.

Every backend spells the shared options the same way:

- ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a :class:`Device`);
- ``cuda_graph``: a :class:`Switch` (``auto`` is the backend's default), or True / False / None;
- ``precision``: an :class:`engine.specs.Precision` (``fp32``, ``fp16``, ``bf16``) where the backend
  chooses one at load time.

Backend-specific extras (threads, fused_attention, io_binding, timing, ...) are fields of the same
dataclass, parsed by :func:`parse_backend_options` with one-line errors listing the valid names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from engine.errors import EngineError

OptionsT = TypeVar("OptionsT")


class Switch(str, Enum):
    """A tri-state setting: ``auto`` lets the component decide (documented where the switch is)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def of(cls, value: Switch | str | bool | None) -> Switch:
        """A Switch from its name or value, True / False, or None (auto); ValueError otherwise."""
        if value is None:
            return cls.AUTO
        if isinstance(value, bool):
            return cls.ON if value else cls.OFF
        return cls(value)

    def resolve(self, default: bool) -> bool:
        """On or off, with auto meaning ``default``."""
        return default if self is Switch.AUTO else self is Switch.ON

    def as_optional(self) -> bool | None:
        """None for auto, else the bool: for APIs that take ``bool | None``."""
        return None if self is Switch.AUTO else self is Switch.ON


class DeviceKind(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class Device:
    """Where a backend runs: the CPU, or one CUDA device. Written ``cpu``, ``cuda`` or ``cuda:N``."""

    kind: DeviceKind
    index: int = 0

    @classmethod
    def parse(cls, text: Device | str) -> Device:
        """A Device from ``cpu``, ``cuda`` or ``cuda:N``; ValueError naming the accepted spellings."""
        if isinstance(text, Device):
            return text
        name, _, index = str(text).strip().lower().partition(":")
        try:
            kind = DeviceKind(name)
            number = int(index) if index else 0
        except ValueError:
            raise ValueError(f"device {text!r} is not cpu, cuda or cuda:N") from None
        if number < 0 or (kind is DeviceKind.CPU and number != 0):
            raise ValueError(f"device {text!r} is not cpu, cuda or cuda:N")
        return cls(kind, number)

    def __str__(self) -> str:
        return self.kind.value if self.kind is DeviceKind.CPU else f"cuda:{self.index}"


CPU = Device(DeviceKind.CPU)
CUDA = Device(DeviceKind.CUDA)


def enum_fields(cls: type) -> dict[str, type[Enum]]:
    """Fields typed with an Enum (or an optional Enum): their values may be given by name."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        enums = [c for c in candidates if isinstance(c, type) and issubclass(c, Enum)]
        if enums:
            found[name] = enums[0]
    return found


def device_fields(cls: type) -> set[str]:
    """Fields typed with :class:`Device` (or an optional one): they take ``cpu`` / ``cuda:N`` strings."""
    found = set()
    for name, hint in typing.get_type_hints(cls).items():
        candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if Device in candidates:
            found.add(name)
    return found


def _coerce(name: str, value: Any, enums: Mapping[str, type[Enum]], devices: set[str]) -> Any:
    if value is None:
        return None if enums.get(name) is not Switch else Switch.AUTO
    if name in devices:
        return Device.parse(value)
    if enums.get(name) is Switch:
        return Switch.of(value)
    if name in enums:
        return enums[name](value)
    return value


def parse_backend_options(cls: type[OptionsT], options: Mapping[str, Any], backend: str) -> OptionsT:
    """cls(**options) with enum values given by value ("bf16"), switches by bool or name, devices by
    ``cpu`` / ``cuda:N``; or a one-line EngineError listing the valid option names and enum values."""
    enums = enum_fields(cls)
    devices = device_fields(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(names))
    try:
        if unknown:
            raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        fields = {name: _coerce(name, value, enums, devices) for name, value in options.items()}
        return cls(**fields)
    except (TypeError, ValueError) as error:
        choices = "".join(
            f"; {name}: {', '.join(str(e.value) for e in enum)}" for name, enum in enums.items()
        )
        shown = {k: str(v) if isinstance(v, Device) else v for k, v in options.items()}
        raise EngineError(
            f"bad {backend} backend options {shown} ({error}); valid: {', '.join(names)}{choices}"
        ) from None
