"""The VAE: its LDM <-> diffusers key map, and reading a replacement VAE ("VAE swap").

LDM (CompVis ``AutoencoderKL``, under ``first_stage_model.`` in a checkpoint, bare in a VAE file such
as vae-ft-mse-840000-ema-pruned.safetensors) against diffusers' ``AutoencoderKL``:

======================================  ================================================
LDM                                     diffusers
======================================  ================================================
``encoder.down.i.block.j``              ``encoder.down_blocks.i.resnets.j``
``encoder.down.i.downsample.conv``      ``encoder.down_blocks.i.downsamplers.0.conv``
``decoder.up.k.block.j``                ``decoder.up_blocks.(n-1-k).resnets.j`` (reversed)
``decoder.up.k.upsample.conv``          ``decoder.up_blocks.(n-1-k).upsamplers.0.conv``
``*.mid.block_1`` / ``block_2``         ``*.mid_block.resnets.0`` / ``resnets.1``
``*.mid.attn_1.{norm,q,k,v,proj_out}``  ``*.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
``*.norm_out``                          ``*.conv_norm_out``
``nin_shortcut``                        ``conv_shortcut``
======================================  ================================================

(``n`` levels). LDM stores the mid-block attention projections as 1x1 convolutions (C, C, 1, 1);
diffusers as Linear (C, C). Some files already spell them ``to_q`` / ``to_k`` / ``to_v`` /
``to_out.0`` with Linear shapes (written by converters run on newer diffusers), see
:func:`vae_attention`. The correspondence is diffusers' ``convert_ldm_vae_checkpoint``
(``diffusers/loaders/single_file_utils.py``), stated here as data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import KeyRule, Transform, apply_rules, layer_rules, resnet_rules
from engine.models.checkpoint.tensors import Float32Tensors, TensorFile, first_names, open_tensors
from engine.models.folder import find_weights, read_json
from engine.models.torch_modules import meta_module

LDM_VAE_PREFIX = "first_stage_model."
# Keys a bare VAE file may carry besides the VAE: the EMA copy and the training loss (discriminator).
IGNORED_VAE_PREFIXES = ("model_ema.", "loss.")
_RESNET_LAYERS = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_ATTENTION_PROJECTIONS = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
# Old diffusers AutoencoderKL folders (2022, e.g. sd-vae-ft-mse) name the attention like this.
_DEPRECATED_ATTENTION = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))


class VaeAttention(str, Enum):
    """How a checkpoint spells the VAE mid-block attention."""

    LDM = "ldm"  # q, k, v, proj_out as (C, C, 1, 1) convolutions
    DIFFUSERS = "diffusers"  # to_q, to_k, to_v, to_out.0 as (C, C) Linear weights


class VaeKind(str, Enum):
    DIFFUSERS_FOLDER = "diffusers-folder"
    SINGLE_FILE = "single-file"


@dataclass(frozen=True)
class VaeWeights:
    """A VAE read from disk: diffusers config and diffusers-named float32 tensors."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    source: Path
    kind: VaeKind
    weights_path: Path  # the file the tensors came from (what A1111's "VAE hash" hashes)


def _resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> Iterator[KeyRule]:
    shortcut = "nin_shortcut" if in_channels != out_channels else None
    return resnet_rules(ldm, diffusers, _RESNET_LAYERS, shortcut)


def _mid(ldm: str, diffusers: str, attention: VaeAttention, with_attention: bool) -> Iterator[KeyRule]:
    yield from _resnet(f"{ldm}.mid.block_1", f"{diffusers}.mid_block.resnets.0", 1, 1)
    if with_attention:
        attn, out = f"{ldm}.mid.attn_1", f"{diffusers}.mid_block.attentions.0"
        yield from layer_rules(f"{attn}.norm", f"{out}.group_norm")
        ldm_spelling = attention is VaeAttention.LDM
        weight = Transform.CONV1X1_TO_LINEAR if ldm_spelling else Transform.LINEAR
        for ldm_name, diffusers_name in _ATTENTION_PROJECTIONS:
            yield from layer_rules(
                f"{attn}.{ldm_name if ldm_spelling else diffusers_name}", f"{out}.{diffusers_name}", weight
            )
    yield from _resnet(f"{ldm}.mid.block_2", f"{diffusers}.mid_block.resnets.1", 1, 1)


def _levels(
    ldm: str, diffusers: str, channels: tuple[int, ...], per_block: int, up: bool
) -> Iterator[KeyRule]:
    """The encoder's down levels, or (``up``) the decoder's up levels, in diffusers' order with
    ``channels`` in that order: ``per_block`` ResNets each (the first from the previous level's
    channels), then a resampler except at the last level. LDM numbers the decoder's levels from the
    highest resolution, diffusers from the lowest."""
    side, sampler = ("up", "upsample") if up else ("down", "downsample")
    levels = len(channels)
    for i, out_ch in enumerate(channels):
        k = levels - 1 - i if up else i
        for j in range(per_block):
            in_ch = channels[max(i - 1, 0)] if j == 0 else out_ch
            yield from _resnet(
                f"{ldm}.{side}.{k}.block.{j}", f"{diffusers}.{side}_blocks.{i}.resnets.{j}", in_ch, out_ch
            )
        if i < levels - 1:
            yield from layer_rules(
                f"{ldm}.{side}.{k}.{sampler}.conv", f"{diffusers}.{side}_blocks.{i}.{sampler}rs.0.conv"
            )


_REQUIRED = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types")


def _check_config(config: Mapping[str, Any]) -> None:
    absent = [key for key in _REQUIRED if key not in config]
    if absent:
        raise ModelFolderError(f"VAE config: no {', '.join(absent)}")
    down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or len(down) != len(up):
        raise ModelFolderError(
            f"VAE config: block types {down} / {up} are not a Stable Diffusion AutoencoderKL"
        )
    if not isinstance(config["layers_per_block"], int):
        raise ModelFolderError(f"VAE config: layers_per_block={config['layers_per_block']!r} is not an int")


def vae_rules(
    config: Mapping[str, Any], prefix: str = LDM_VAE_PREFIX, attention: VaeAttention | str = VaeAttention.LDM
) -> list[KeyRule]:
    """One rule per tensor of the diffusers ``AutoencoderKL`` that ``config`` builds (``block_out_channels``,
    ``layers_per_block``, ``down_block_types``, ``up_block_types``; ``mid_block_add_attention``,
    ``use_quant_conv``, ``use_post_quant_conv`` default true), LDM names under ``prefix`` ("" for a
    bare VAE file). ``attention`` is the file's spelling of the mid-block attention (:func:`vae_attention`).
    Raises ModelFolderError (one line) for a config that is not an SD-style AutoencoderKL.
    """
    _check_config(config)
    spelling = VaeAttention(attention)
    channels = tuple(int(c) for c in config["block_out_channels"])
    per_block = int(config["layers_per_block"])
    with_attention = bool(config.get("mid_block_add_attention", True))
    p = prefix
    rules = [*layer_rules(f"{p}encoder.conv_in", "encoder.conv_in")]
    rules += _levels(f"{p}encoder", "encoder", channels, per_block, up=False)
    rules += _mid(f"{p}encoder", "encoder", spelling, with_attention)
    rules += layer_rules(f"{p}encoder.norm_out", "encoder.conv_norm_out")
    rules += layer_rules(f"{p}encoder.conv_out", "encoder.conv_out")
    if config.get("use_quant_conv", True):
        rules += layer_rules(f"{p}quant_conv", "quant_conv")
    if config.get("use_post_quant_conv", True):
        rules += layer_rules(f"{p}post_quant_conv", "post_quant_conv")
    rules += layer_rules(f"{p}decoder.conv_in", "decoder.conv_in")
    rules += _mid(f"{p}decoder", "decoder", spelling, with_attention)
    rules += _levels(f"{p}decoder", "decoder", channels[::-1], per_block + 1, up=True)
    rules += layer_rules(f"{p}decoder.norm_out", "decoder.conv_norm_out")
    rules += layer_rules(f"{p}decoder.conv_out", "decoder.conv_out")
    return rules


def vae_attention(keys: Iterable[str], prefix: str = LDM_VAE_PREFIX) -> VaeAttention:
    """The attention spelling of the VAE under ``prefix`` in a checkpoint with these tensor names:
    DIFFUSERS if its mid-block attention has a ``to_q`` weight, else LDM."""
    names = set(keys)
    diffusers = {f"{prefix}{part}.mid.attn_1.to_q.weight" for part in ("encoder", "decoder")}
    return VaeAttention.DIFFUSERS if names & diffusers else VaeAttention.LDM


def vae_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the diffusers ``AutoencoderKL`` that ``config`` builds (on the
    meta device: no memory, well under a second). ModelFolderError if diffusers rejects the config."""
    return {name: tuple(t.shape) for name, t in meta_module("vae", config).state_dict().items()}


def _full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed with diffusers' AutoencoderKL defaults for the keys it leaves out."""
    return {k: v for k, v in meta_module("vae", config).config.items() if not k.startswith("_")}


def read_vae(path: str | Path, config: Mapping[str, Any] | None = None) -> VaeWeights:
    """A replacement VAE, as diffusers-named float32 tensors checked against its config.

    ``path`` is either a diffusers ``AutoencoderKL`` folder (``config.json`` plus
    ``diffusion_pytorch_model[.fp16].safetensors`` or ``.bin``; a model folder's ``vae/`` is found
    too; old ``query`` / ``key`` / ``value`` / ``proj_attn`` names are accepted), or a single VAE file:
    ``.safetensors``, or ``.pt`` / ``.ckpt`` / ``.bin`` read with ``torch.load(weights_only=True)``
    (a ``{"state_dict": ...}`` wrapper is unwrapped, non-tensor entries skipped). A single file holds
    bare LDM VAE keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``; the
    ``model_ema.*`` and ``loss.*`` keys some carry are ignored), or ``first_stage_model.``-prefixed
    keys (then every key outside that prefix, e.g. the rest of a full checkpoint, is ignored).
    Either attention spelling is accepted (:func:`vae_attention`).

    ``config`` (diffusers AutoencoderKL config) applies to single files only; default: the SD VAE
    (``preset_spec("sd15").vae.config()``, which SD 1.x and 2.x share). A folder uses its config.json.

    Raises ModelFolderError, one line: path not found or of an unknown type; a corrupt or truncated
    file; a pickle that needs code to load (convert it to .safetensors); tensors left unused or
    missing after mapping (the first few named); a tensor whose shape differs from the config's.
    """
    source = Path(path)
    if source.is_dir():
        return _read_vae_folder(source)
    if not source.is_file():
        raise ModelFolderError(f"VAE not found: {source}")
    return _read_vae_file(source, config)


def _read_vae_folder(folder: Path) -> VaeWeights:
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    where = f"VAE folder {folder}"
    config = read_json(folder / "config.json", where)
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ModelFolderError(f"{where}: config.json is a {class_name}, not an AutoencoderKL")
    weights_path = find_weights(folder, ("diffusion_pytorch_model",)).path
    expected = vae_shapes(config)
    rules = [KeyRule(name, (name,)) for name in expected]
    for name in expected:
        for old, new in _DEPRECATED_ATTENTION:
            if f".attentions.0.{new}." in name:
                rules.append(KeyRule(name.replace(f".{new}.", f".{old}."), (name,)))
    with open_tensors(weights_path) as file:
        state_dict = _convert(file, rules, expected, where, "its config.json", counted=list(file))
    return VaeWeights(config, state_dict, folder, VaeKind.DIFFUSERS_FOLDER, weights_path)


def _read_vae_file(path: Path, config: Mapping[str, Any] | None) -> VaeWeights:
    what = "the VAE config"
    if config is None:
        from engine.models.presets import preset_spec

        config, what = preset_spec("sd15").vae.config(), "the SD VAE config"
    where = f"VAE file {path}"
    with open_tensors(path) as file:
        prefix = LDM_VAE_PREFIX if any(k.startswith(LDM_VAE_PREFIX) for k in file) else ""
        rules = vae_rules(_full_config(config), prefix, vae_attention(file, prefix))
        if prefix:  # a full checkpoint, or a VAE saved from one: only its VAE counts
            counted = [k for k in file if k.startswith(prefix)]
        else:
            counted = [k for k in file if not k.startswith(IGNORED_VAE_PREFIXES)]
        state_dict = _convert(file, rules, vae_shapes(config), where, what, counted)
    return VaeWeights(dict(config), state_dict, path, VaeKind.SINGLE_FILE, path)


def _convert(
    file: TensorFile,
    rules: list[KeyRule],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
    what: str,
    counted: list[str],
) -> dict[str, torch.Tensor]:
    """Map (reading each tensor as float32), then check: none of the ``counted`` keys unused, no
    tensor missing, every shape as ``expected``. Float32 tensors in ``expected``'s order."""
    converted = apply_rules(Float32Tensors(file), rules)
    unused = [k for k in counted if k not in converted.used]
    missing = [k for k in expected if k not in converted.state_dict]
    if unused or missing:
        parts = [f"{len(unused)} unused tensors ({first_names(unused)})"] if unused else []
        parts += [f"{len(missing)} missing ({first_names(missing)})"] if missing else []
        raise ModelFolderError(f"{where}: does not match {what}: {'; '.join(parts)}")
    origin = {name: rule.ldm for rule in rules if rule.ldm in converted.used for name in rule.diffusers}
    for name, shape in expected.items():
        if tuple(converted.state_dict[name].shape) != shape:
            stored = list(file.shapes[origin[name]])
            raise ModelFolderError(f"{where}: '{origin[name]}' is {stored}, {what} needs {list(shape)}")
    return {name: converted.state_dict[name] for name in expected}
