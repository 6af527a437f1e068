"""Declarative key maps between a checkpoint's LDM names and diffusers' names.

A map is a list of :class:`KeyRule`: one LDM tensor to one or more diffusers tensors, with the
transform between them. Being data rather than code, the same rules convert LDM to diffusers
(:func:`apply_rules`) and, in tests, diffusers to LDM (:func:`invert_rules`), so a round trip through
diffusers' own ``from_single_file`` checks them independently.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from engine.errors import ModelFolderError

WEIGHT_BIAS = ("weight", "bias")


class Transform(str, Enum):
    RENAME = "rename"  # same tensor, new name
    CONV1X1_TO_LINEAR = "conv1x1_to_linear"  # (out, in, 1, 1) -> (out, in); VAE mid-block attention
    SPLIT_QKV = "split_qkv"  # (3n, ...) -> three (n, ...) along dim 0: OpenCLIP in_proj -> q, k, v
    # A Linear weight stored (out, in), or (out, in, 1, 1) by some files; the inverse writes (out, in).
    # SD 2 UNet proj_in / proj_out; VAE mid-block attention in diffusers spelling (to_q, ...).
    LINEAR = "linear"
    # (in, out) -> (out, in): OpenCLIP's text_projection, applied as x @ P, as a Linear weight (SDXL).
    TRANSPOSE = "transpose"


@dataclass(frozen=True)
class KeyRule:
    """One checkpoint tensor ``ldm`` and the diffusers tensor(s) it becomes."""

    ldm: str
    diffusers: tuple[str, ...]
    transform: Transform = Transform.RENAME


@dataclass(frozen=True)
class Converted:
    """A converted component: diffusers-named tensors and the checkpoint keys they came from."""

    state_dict: dict[str, torch.Tensor]
    used: frozenset[str]


def _forward(rule: KeyRule, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if rule.transform is Transform.RENAME:
        return (tensor,)
    if rule.transform in (Transform.CONV1X1_TO_LINEAR, Transform.LINEAR):
        return (tensor.reshape(tensor.shape[0], -1) if tensor.ndim == 4 else tensor,)
    if rule.transform is Transform.TRANSPOSE:
        if tensor.ndim != 2:
            raise ModelFolderError(f"checkpoint tensor '{rule.ldm}' is {list(tensor.shape)}, not a matrix")
        return (tensor.t().contiguous(),)
    return tuple(tensor.chunk(3, dim=0))


def layer_rules(ldm: str, diffusers: str, transform: Transform = Transform.RENAME) -> Iterator[KeyRule]:
    """A layer's weight and bias: ``<ldm>.weight`` -> ``<diffusers>.weight`` by ``transform``, and
    ``<ldm>.bias`` -> ``<diffusers>.bias`` renamed."""
    for wb in WEIGHT_BIAS:
        yield KeyRule(
            f"{ldm}.{wb}", (f"{diffusers}.{wb}",), transform if wb == "weight" else Transform.RENAME
        )


def resnet_rules(
    ldm: str, diffusers: str, layers: Iterable[tuple[str, str]], shortcut: str | None
) -> Iterator[KeyRule]:
    """A ResNet block: each ``(LDM sub-layer, diffusers sub-layer)`` of ``layers`` renamed, then, when
    the block changes its channel count, the 1x1 shortcut LDM calls ``shortcut`` (diffusers:
    ``conv_shortcut``); ``shortcut`` None: the block has none."""
    for ldm_layer, diffusers_layer in layers:
        yield from layer_rules(f"{ldm}.{ldm_layer}", f"{diffusers}.{diffusers_layer}")
    if shortcut is not None:
        yield from layer_rules(f"{ldm}.{shortcut}", f"{diffusers}.conv_shortcut")


def apply_rules(tensors: Mapping[str, torch.Tensor], rules: Iterable[KeyRule]) -> Converted:
    """Diffusers-named tensors from ``tensors`` (LDM names); a rule whose LDM key is absent is
    skipped (the caller's missing-key check against the model names it). Tensors are not copied."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        if rule.ldm not in tensors:
            continue
        parts = _forward(rule, tensors[rule.ldm])
        if len(parts) != len(rule.diffusers):
            raise ModelFolderError(f"checkpoint tensor '{rule.ldm}' cannot be split into {rule.diffusers}")
        out.update(zip(rule.diffusers, parts, strict=True))
        used.add(rule.ldm)
    return Converted(out, frozenset(used))


def invert_rules(state_dict: Mapping[str, torch.Tensor], rules: Iterable[KeyRule]) -> dict[str, torch.Tensor]:
    """LDM-named tensors from a diffusers state dict (the inverse of :func:`apply_rules`; for tests)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = [state_dict[name] for name in rule.diffusers]
        if rule.transform in (Transform.RENAME, Transform.LINEAR):
            out[rule.ldm] = parts[0]
        elif rule.transform is Transform.TRANSPOSE:
            out[rule.ldm] = parts[0].t().contiguous()
        elif rule.transform is Transform.CONV1X1_TO_LINEAR:
            out[rule.ldm] = parts[0].reshape(*parts[0].shape, 1, 1) if parts[0].ndim == 2 else parts[0]
        else:
            out[rule.ldm] = torch.cat(parts, dim=0)
    return out
