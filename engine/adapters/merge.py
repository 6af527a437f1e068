"""A LoRA file against an engine's weights: which modules it changes (:func:`match_lora`), and the
merged weights (:func:`merge_weight`, ``W + sum m * delta``).

Scales: a module's ``.alpha`` key gives ``alpha / rank`` (kohya, LyCORIS; see
:mod:`engine.adapters.formats`). A diffusers / PEFT file without one may carry its PEFT config in the
safetensors metadata (``lora_adapter_metadata``, written by diffusers' ``save_lora_weights``: JSON of
``<component>.lora_alpha``, ``.r``, ``.alpha_pattern``, ``.rank_pattern``, ``.use_rslora``), which
gives PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), patterns matched as PEFT matches them;
without either the scale is 1 (alpha = rank), as diffusers loads such files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from engine.adapters.files import AdapterError, LoraFile
from engine.adapters.formats import (
    MODIFIER_ROLES,
    DeltaKind,
    ModuleDelta,
    dora_change,
    kind_of,
    kohya_scale,
    magnitude_axis,
    natural_shape,
    rank_of,
)
from engine.adapters.keys import (
    FAMILY_NAMES,
    Component,
    Style,
    Target,
    base_model_note,
    guess_family,
    spelling_index,
    split_key,
    unsupported_kind,
)

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders/lora_base.py LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class LoraMatch:
    """A LoRA file's deltas against one engine.

    deltas: one per module the file changes; unused_keys: every file key not in a delta (bias diffs,
    bundled embeddings, modules the engine lacks, LyCORIS algorithms not applied); matched / total:
    modules of the file that found a weight / modules (delta-forming key groups) in the file.
    """

    name: str
    deltas: tuple[ModuleDelta, ...]
    unused_keys: tuple[str, ...]
    matched: int
    total: int


@dataclass(frozen=True)
class PeftConfig:
    """The fields of one component's PEFT config that set a LoRA's scale."""

    r: int | None
    lora_alpha: float | None
    rank_pattern: Mapping[str, float]
    alpha_pattern: Mapping[str, float]
    use_rslora: bool


def group_keys(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Keys by module spelling: spelling -> role -> key; and the keys no role was recognised in."""
    modules: dict[str, dict[str, str]] = {}
    stray: list[str] = []
    for key in keys:
        split = split_key(key)
        roles = modules.setdefault(split[0], {}) if split else None
        if split is None or roles is None or split[1] in roles:
            stray.append(key)
            continue
        roles[split[1]] = key
    return modules, stray


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterError(f"{what} is {value!r}, not a number")
    return float(value)


def peft_configs(metadata: Mapping[str, str], name: str) -> dict[Component, PeftConfig]:
    """Per component, the PEFT config diffusers stored in the file's metadata (none: empty)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterError(f"{name}: metadata {PEFT_METADATA_KEY} is not JSON") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{name}: metadata {PEFT_METADATA_KEY} is not a JSON object")
    configs = {}
    for component in Component:
        prefix = f"{component.value}."
        fields = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
        if not fields:
            continue
        what = f"{name}: {PEFT_METADATA_KEY} {component.value}"
        patterns = {}
        for field in ("rank_pattern", "alpha_pattern"):
            value = fields.get(field) or {}
            if not isinstance(value, dict):
                raise AdapterError(f"{what}.{field} is not an object")
            patterns[field] = MappingProxyType(
                {str(k): _number(v, f"{what}.{field}[{k!r}]") for k, v in value.items()}
            )
        r, alpha = fields.get("r"), fields.get("lora_alpha")
        configs[component] = PeftConfig(
            r=None if r is None else int(_number(r, f"{what}.r")),
            lora_alpha=None if alpha is None else _number(alpha, f"{what}.lora_alpha"),
            rank_pattern=patterns["rank_pattern"],
            alpha_pattern=patterns["alpha_pattern"],
            use_rslora=bool(fields.get("use_rslora", False)),
        )
    return configs


def _pattern_value(patterns: Mapping[str, float], module: str, what: str) -> float | None:
    """PEFT's get_pattern_key: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching the module name."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            raise AdapterError(f"{what}: pattern {pattern!r} is not a regular expression") from None
    return None


def peft_scale(
    config: PeftConfig, target: Target, kind: DeltaKind, arrays: Mapping[str, np.ndarray], what: str
) -> float:
    """PEFT's scaling of one module: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), each from its pattern
    when one matches the module's name in the PEFT model."""
    component, path = target
    # a text encoder's modules are `text_model.<path>` in transformers 4, `<path>` in 5
    names = (path,) if component is Component.UNET else (f"text_model.{path}", path)
    alpha = next((v for n in names if (v := _pattern_value(config.alpha_pattern, n, what)) is not None), None)
    rank = next((v for n in names if (v := _pattern_value(config.rank_pattern, n, what)) is not None), None)
    alpha = config.lora_alpha if alpha is None else alpha
    rank = rank or config.r or rank_of(kind, arrays)
    if kind is DeltaKind.FULL or alpha is None or not rank:
        return 1.0
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def _alpha(array: np.ndarray, what: str) -> float:
    """A stored alpha (0-d, any float dtype) as a number."""
    if array.size != 1:
        raise AdapterError(f"{what}: alpha has shape {tuple(array.shape)}, not one number")
    value = float(np.asarray(array, dtype=np.float64).reshape(()))
    if not math.isfinite(value):
        raise AdapterError(f"{what}: alpha is {value}")
    return value


def _module_delta(
    lora: LoraFile,
    spelling: str,
    kind: DeltaKind,
    roles: Mapping[str, str],
    hit: tuple[Target, Style],
    base_shape: tuple[int, ...],
    configs: Mapping[Component, PeftConfig],
) -> ModuleDelta:
    target, style = hit
    what = f"{lora.path.name}: {spelling}"
    arrays = {role: lora.tensors[key] for role, key in roles.items() if role not in MODIFIER_ROLES}
    shape = natural_shape(kind, arrays, what)
    if math.prod(shape) != math.prod(base_shape) or shape[0] != base_shape[0]:
        raise AdapterError(
            f"{what} is a {shape} delta, but the engine's {target[0].value} {target[1]} is "
            f"{tuple(base_shape)}"
        )
    alpha = _alpha(lora.tensors[roles["alpha"]], what) if "alpha" in roles else None
    if alpha is None and style is Style.PEFT and target[0] in configs:
        scale = peft_scale(configs[target[0]], target, kind, arrays, what)
    else:
        scale = kohya_scale(kind, arrays, alpha)
    magnitude = axis = None
    for role in ("dora_scale", "magnitude"):
        if role in roles:
            stored = lora.tensors[roles[role]]
            axis = magnitude_axis(
                stored, base_shape, f"{lora.path.name}: {roles[role]}", peft=role == "magnitude"
            )
            magnitude = np.asarray(stored, dtype=np.float32).reshape(-1)
    return ModuleDelta(
        target=target,
        kind=kind,
        keys=tuple(roles.values()),
        arrays=MappingProxyType(arrays),
        scale=scale,
        shape=shape,
        magnitude=magnitude,
        magnitude_axis=axis,
    )


def _kinds(lora: LoraFile, modules: Mapping[str, Mapping[str, str]]) -> dict[str, DeltaKind | None]:
    kinds = {}
    for spelling, roles in modules.items():
        try:
            kinds[spelling] = kind_of(set(roles))
        except AdapterError as error:
            raise AdapterError(f"{lora.path.name}: {spelling}: {error}") from None
    return kinds


def _no_match(lora: LoraFile, family: str, modules: Sequence[str]) -> AdapterError:
    """The error for a file none of whose modules matched: what the file holds instead."""
    name, engine = lora.path.name, FAMILY_NAMES.get(family, family)
    unsupported = sorted({kind for key in lora.tensors if (kind := unsupported_kind(key))})
    if unsupported:
        return AdapterError(
            f"{name}: LyCORIS {'/'.join(unsupported)} modules, which sd-engine does not apply"
        )
    if not lora.tensors:
        return AdapterError(f"{name}: the file holds no tensors")
    if not modules:
        return AdapterError(
            f"{name}: no LoRA weights (no lora_down / lora_A / hada_ / lokr_ keys; e.g. "
            f"{sorted(lora.tensors)[0]})"
        )
    return AdapterError(
        f"{name}: 0 of {len(modules)} modules matched this {engine} engine's UNet and text encoder "
        f"(e.g. {sorted(modules)[0]}){base_model_note(lora.metadata)}"
    )


def match_lora(lora: LoraFile, targets: Mapping[Target, tuple[int, ...]], family: str) -> LoraMatch:
    """The deltas of ``lora`` against an engine's LoRA-able weights.

    targets: (component, module path) -> the weight's torch-layout shape, for every weight a LoRA may
    change; family: the engine's base ('sd1', 'sd2'). Raises AdapterError (one line naming the file)
    when the file's keys, shapes or metadata show another base family, when none of its modules
    matches a target, when a matched module's delta does not fit its weight, and for malformed
    factors or DoRA magnitudes. Keys not applied are listed in ``unused_keys``, never dropped.
    """
    modules, unused = group_keys(lora.tensors)
    kinds = _kinds(lora, modules)
    index = spelling_index(targets)
    formed = [spelling for spelling, kind in kinds.items() if kind is not None]
    hits = {spelling: index[spelling] for spelling in formed if spelling in index}
    arrays = {s: {role: lora.tensors[key] for role, key in roles.items()} for s, roles in modules.items()}
    guess = guess_family(arrays, lora.metadata)
    if guess is not None and guess.family != family:
        raise AdapterError(
            f"{lora.path.name}: {len(hits)} of {len(formed)} modules matched; this looks like "
            f"{guess.describe()}, and this engine is {FAMILY_NAMES.get(family, family)}"
        )
    if not hits:
        raise _no_match(lora, family, formed)
    configs = peft_configs(lora.metadata, lora.path.name)
    deltas = []
    for spelling, roles in modules.items():
        hit = hits.get(spelling)
        if hit is None:
            unused.extend(roles.values())
            continue
        kind = kinds[spelling]
        assert kind is not None  # hits holds formed modules only
        deltas.append(_module_delta(lora, spelling, kind, roles, hit, targets[hit[0]], configs))
    return LoraMatch(
        name=lora.name,
        deltas=tuple(deltas),
        unused_keys=tuple(sorted(unused)),
        matched=len(hits),
        total=len(formed),
    )


def merge_weight(base: np.ndarray, parts: Sequence[tuple[ModuleDelta, float]]) -> np.ndarray:
    """``base + sum(multiplier * delta)`` over ``parts``, computed in float32 (float64 for a float64
    base) and returned in base's dtype; a new array (base may be a read-only memmap).

    A DoRA part adds ``multiplier * (W_dora - W)``, its DoRA weight taken from the original base, so
    parts add up in any order and a multiplier of 0 leaves the weight as it was.
    """
    if not np.issubdtype(base.dtype, np.floating):
        raise TypeError(f"merge_weight needs a floating-point weight, not {base.dtype}")
    work_dtype = np.promote_types(base.dtype, np.float32)
    work = np.array(base, dtype=work_dtype, copy=True)
    original = work.copy() if any(delta.magnitude is not None for delta, _ in parts) else None
    for delta, multiplier in parts:
        if not multiplier:
            continue
        change = delta.delta(work.shape)
        if delta.magnitude is not None:
            assert original is not None and delta.magnitude_axis is not None
            change = dora_change(original, change, delta.magnitude, delta.magnitude_axis)
        work += np.asarray(multiplier, dtype=work_dtype) * change
    return work.astype(base.dtype, copy=False)
