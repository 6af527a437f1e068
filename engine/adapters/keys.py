"""Which model weight a LoRA file's key changes: key spellings, the LDM UNet names, the base family.

A LoRA key is ``<module spelling>.<suffix>``. The suffix says what the tensor is (``lora_down.weight``,
``lora_A.weight``, ``hada_w1_a``, ``alpha``, ...: :data:`SUFFIX_ROLES`); the module spelling says which
layer it changes, in one of the spellings trainers write:

=================  ==================================================================================
kohya / A1111      ``lora_unet_<path with . -> _>``, ``lora_te_text_model_<path>`` (SD 1/2),
                   ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders)
kohya, LDM names   ``lora_unet_input_blocks_1_1_proj_in``, ``middle_block_1_...``, ``output_blocks_...``
                   (kohya's SDXL trainer and others that train the original LDM UNet)
diffusers / PEFT   ``unet.<path>``, ``text_encoder.[text_model.]<path>``, ``text_encoder_2.<path>``,
                   or bare ``<path>`` (UNet) / ``text_model.<path>`` (text encoder)
=================  ==================================================================================

Spellings are matched by building every spelling of every target of the engine and looking the file's
spelling up, never by guessing where an underscore was a dot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Component(str, Enum):
    """The network a LoRA weight belongs to (each gets its own multiplier)."""

    UNET = "unet"
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"


# (component, diffusers module path without ".weight"; text encoder paths relative to CLIPTextTransformer)
Target = tuple[Component, str]

# key suffix -> the role of its tensor in a module's delta
SUFFIX_ROLES: Mapping[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    **{f"hada_{name}": f"hada_{name}" for name in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{name}": f"lokr_{name}" for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": "diff",
}
_SUFFIXES = sorted(SUFFIX_ROLES, key=len, reverse=True)
# Suffixes of LyCORIS algorithms sd-engine does not apply: named in the error when nothing else matched.
UNSUPPORTED_SUFFIXES: Mapping[str, str] = {
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "oft_R": "BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "w_norm": "norm",
    "b_norm": "norm",
    "on_input": "IA3",
}
# diffusers' first LoRA format (attention processors): `<attn>.processor.to_q_lora.down.weight`
_OLD_ATTENTION = re.compile(
    r"^(?P<module>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_OLD_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_key(key: str) -> tuple[str, str] | None:
    """(module spelling, role) of a LoRA key, or None when its suffix is not one this module applies."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIX_ROLES[suffix]
    match = _OLD_ATTENTION.match(key)
    if match is None:
        return None
    module = match["module"]
    projections = _OLD_TEXT_PROJ if module.startswith(("text_encoder", "text_model")) else _OLD_UNET_PROJ
    return f"{module}.{projections[match['proj']]}", match["part"]


def unsupported_kind(key: str) -> str | None:
    """The LyCORIS algorithm a key belongs to when sd-engine does not apply it (OFT, GLoRA, ...)."""
    return next((kind for suffix, kind in UNSUPPORTED_SUFFIXES.items() if key.endswith("." + suffix)), None)


# -- spellings ------------------------------------------------------------------------------------


class Style(str, Enum):
    KOHYA = "kohya"  # underscored names; alpha from `.alpha` keys
    PEFT = "peft"  # dotted diffusers / PEFT names; alpha from `.alpha` keys or diffusers' metadata


def _kohya(path: str) -> str:
    return path.replace(".", "_")


def _spellings(target: Target, ldm: str | None, two_encoders: bool) -> Iterator[tuple[str, Style]]:
    """A target's spellings; kohya's ``lora_te1_`` only for a model with a second text encoder (SDXL),
    so an SDXL LoRA's first text encoder never half-matches an SD 1.x one of the same width."""
    component, path = target
    if component is Component.UNET:
        yield f"lora_unet_{_kohya(path)}", Style.KOHYA
        if ldm is not None:
            yield f"lora_unet_{_kohya(ldm)}", Style.KOHYA
        yield from ((f"{p}{path}", Style.PEFT) for p in ("unet.", "", "base_model.model."))
    elif component is Component.TEXT_ENCODER:
        yield f"lora_te_text_model_{_kohya(path)}", Style.KOHYA
        if two_encoders:
            yield f"lora_te1_text_model_{_kohya(path)}", Style.KOHYA
        prefixes = (
            "text_encoder.",
            "text_encoder.text_model.",
            "text_model.",
            "base_model.model.text_model.",
        )
        yield from ((f"{p}{path}", Style.PEFT) for p in prefixes)
    else:
        yield f"lora_te2_text_model_{_kohya(path)}", Style.KOHYA
        yield from ((f"{p}{path}", Style.PEFT) for p in ("text_encoder_2.", "text_encoder_2.text_model."))


def spelling_index(targets: Iterable[Target]) -> dict[str, tuple[Target, Style]]:
    """Every spelling of every target -> (target, style). A spelling two targets share (none do in
    SD's modules) is left out rather than applied to either."""
    targets = list(targets)
    ldm = ldm_unet_paths(path for component, path in targets if component is Component.UNET)
    two_encoders = any(component is Component.TEXT_ENCODER_2 for component, _ in targets)
    index: dict[str, tuple[Target, Style] | None] = {}
    for target in targets:
        ldm_path = ldm.get(target[1]) if target[0] is Component.UNET else None
        for spelling, style in _spellings(target, ldm_path, two_encoders):
            seen = index.get(spelling)
            index[spelling] = (target, style) if spelling not in index or seen == (target, style) else None
    return {spelling: found for spelling, found in index.items() if found is not None}


# -- the LDM UNet ---------------------------------------------------------------------------------

# ResBlock sub-layers diffusers -> LDM (the LoRA-able ones: convolutions and the time projection)
_RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")


def _inner(kind: str, rest: str) -> str | None:
    """A layer inside a ResBlock (renamed) or a SpatialTransformer (same name in both layouts)."""
    if kind == "attentions":
        return rest
    return _RESNET_LAYERS.get(rest)


def ldm_unet_paths(paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> the original LDM UNet's (``down_blocks.0.attentions.0.proj_in`` ->
    ``input_blocks.1.1.proj_in``), for the SD-style UNet the paths come from.

    The block numbering is that of diffusers' single-file converter (see
    engine/models/checkpoint/unet.py): ``input_blocks.N`` with ``N = 1 + i * (layers + 1) + j``,
    ``output_blocks.M`` with ``M = i * (layers + 1) + j``, the downsampler in slot ``j = layers``, the
    upsampler after the attention (``.2``) or the ResBlock (``.1``). ``layers`` (ResBlocks per down
    level) and which up levels have attention are read off the paths themselves.
    """
    paths = list(paths)
    blocks = [(m[1], int(m[2]), m[3], int(m[4])) for m in map(_BLOCK.match, paths) if m]
    per_level = 1 + max(
        (j for side, _, kind, j in blocks if side == "down_blocks" and kind == "resnets"), default=0
    )
    up_attention = {i for side, i, kind, _ in blocks if side == "up_blocks" and kind == "attentions"}
    out: dict[str, str] = {}
    for path in paths:
        ldm = _ldm_path(path, per_level, up_attention)
        if ldm is not None:
            out[path] = ldm
    return out


def _ldm_path(path: str, per_level: int, up_attention: set[int]) -> str | None:
    if path in _FIXED:
        return _FIXED[path]
    if match := _BLOCK.match(path):
        side, i, kind, j, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        inner = _inner(kind, rest)
        slot = 1 if kind == "attentions" else 0
        number = 1 + i * (per_level + 1) + j if side == "down_blocks" else i * (per_level + 1) + j
        block = "input_blocks" if side == "down_blocks" else "output_blocks"
        return None if inner is None else f"{block}.{number}.{slot}.{inner}"
    if match := _MID.match(path):
        kind, j, rest = match[1], int(match[2]), match[3]
        inner = _inner(kind, rest)
        number = 1 if kind == "attentions" else 2 * j
        return None if inner is None else f"middle_block.{number}.{inner}"
    if match := _SAMPLER.match(path):
        i = int(match[2])
        if match[1] == "down_blocks":
            return f"input_blocks.{1 + i * (per_level + 1) + per_level}.0.op"
        return f"output_blocks.{i * (per_level + 1) + per_level}.{2 if i in up_attention else 1}.conv"
    return None


# -- the base model family ------------------------------------------------------------------------

FAMILY_NAMES: Mapping[str, str] = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
_CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_WIDTHS = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
_CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
_TEXT_IN = re.compile(r"(?:self_attn[._][qkv]_proj|mlp[._]fc1)$")
_DEEP_BLOCK = re.compile(r"transformer_blocks[._][1-9]")
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
# (metadata key, value prefix, family), first match wins
_METADATA_FAMILIES = (
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v2", "sd2"),
    ("ss_base_model_version", "sd_v1", "sd1"),
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd1"),
    ("ss_v2", "True", "sd2"),
)


@dataclass(frozen=True)
class FamilyGuess:
    """The base model a LoRA was trained on, and the evidence (for the error message)."""

    family: str
    reason: str

    def describe(self) -> str:
        """'an SDXL LoRA (lora_te2_ keys)'."""
        name = FAMILY_NAMES.get(self.family)
        return f"an {name} LoRA ({self.reason})" if name else f"a LoRA for {self.family} ({self.reason})"


def _input_width(roles: Mapping[str, np.ndarray]) -> int | None:
    """The input width a module's delta reads: lora_down's (or hada_w1_b's) second axis."""
    for role in ("down", "hada_w1_b"):
        array = roles.get(role)
        if array is not None and array.ndim >= 2:
            return int(array.shape[1])
    return None


def _width_evidence(
    modules: Mapping[str, Mapping[str, np.ndarray]],
    pattern: re.Pattern[str],
    widths: Mapping[int, str],
    what: str,
) -> FamilyGuess | None:
    for spelling, roles in modules.items():
        if pattern.search(spelling) and (width := _input_width(roles)) in widths:
            return FamilyGuess(widths[width], f"{width}-wide {what}")
    return None


def guess_family(
    modules: Mapping[str, Mapping[str, np.ndarray]], metadata: Mapping[str, str]
) -> FamilyGuess | None:
    """The base family ('sd1', 'sd2', 'sdxl') a LoRA's keys, shapes or metadata show, or None.

    modules: module spelling -> role -> array. Evidence, strongest first: SDXL-only key prefixes
    (``lora_te1_``/``lora_te2_``/``text_encoder_2.``), the cross-attention width (768 SD 1, 1024 SD 2,
    2048 SDXL), the text encoder width (768 / 1024 / 1280), transformer blocks past the first (SDXL's
    deeper transformers), then kohya's ``ss_base_model_version`` or ``modelspec.architecture``.
    """
    prefix = next((p for p in _SDXL_PREFIXES for spelling in modules if spelling.startswith(p)), None)
    if prefix is not None:
        return FamilyGuess("sdxl", f"{prefix} keys")
    for pattern, widths, what in (
        (_CROSS_KV, _CROSS_ATTENTION_WIDTHS, "cross-attention"),
        (_TEXT_IN, _TEXT_WIDTHS, "text encoder"),
    ):
        if (guess := _width_evidence(modules, pattern, widths, what)) is not None:
            return guess
    deep = next(
        (s for s in modules if not s.startswith(("lora_te", "text_")) and _DEEP_BLOCK.search(s)), None
    )
    if deep is not None:
        return FamilyGuess("sdxl", f"{deep}: more than one transformer block per attention")
    for key, prefix, family in _METADATA_FAMILIES:
        value = metadata.get(key, "")
        if value.startswith(prefix):
            return FamilyGuess(family, f"metadata {key}={value}")
    return None


def base_model_note(metadata: Mapping[str, str]) -> str:
    """What the metadata says the base model is ('; its metadata says ss_base_model_version=flux1'),
    for errors about a file that matched nothing; empty when it says nothing."""
    said = [
        f"{key}={metadata[key]}"
        for key in ("ss_base_model_version", "modelspec.architecture")
        if metadata.get(key)
    ]
    return f"; its metadata says {', '.join(said)}" if said else ""
