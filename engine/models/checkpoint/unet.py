"""Key map of a Stable Diffusion 1.x / 2.x UNet between the LDM checkpoint layout and diffusers.

LDM (CompVis ``openaimodel.UNetModel``, what A1111 / ComfyUI checkpoints hold under
``model.diffusion_model.``) numbers its blocks flat; diffusers nests them per resolution level:

==========================================  ==============================================
LDM                                         diffusers ``UNet2DConditionModel``
==========================================  ==============================================
``time_embed.0`` / ``.2``                   ``time_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``                        ``conv_in``
``input_blocks.N.0`` (ResBlock)             ``down_blocks.i.resnets.j``
``input_blocks.N.1`` (SpatialTransformer)   ``down_blocks.i.attentions.j``
``input_blocks.N.0.op``                     ``down_blocks.i.downsamplers.0.conv``
``middle_block.0`` / ``.1`` / ``.2``        ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.M.0`` / ``.1``              ``up_blocks.i.resnets.j`` / ``attentions.j``
``output_blocks.M.{1,2}.conv``              ``up_blocks.i.upsamplers.0.conv`` (``.2`` after an attention)
``out.0`` / ``out.2``                       ``conv_norm_out`` / ``conv_out``
==========================================  ==============================================

with ``N = 1 + i * (layers_per_block + 1) + j`` (the downsampler takes the slot
``j = layers_per_block``) and ``M = i * (layers_per_block + 1) + j``. Inside a ResBlock,
``in_layers.0/.2``, ``emb_layers.1``, ``out_layers.0/.3`` and ``skip_connection`` are ``norm1``,
``conv1``, ``time_emb_proj``, ``norm2``, ``conv2`` and ``conv_shortcut``; a SpatialTransformer's
tensors keep their names. The correspondence is the one diffusers' own converter implements
(``diffusers/loaders/single_file_utils.py``, ``convert_ldm_unet_checkpoint``); this module states
it as data, one :class:`KeyRule` per tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import WEIGHT_BIAS, KeyRule, Transform, layer_rules, resnet_rules

LDM_UNET_PREFIX = "model.diffusion_model."
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# ResBlock sub-layers: LDM name -> diffusers name (the shortcut only where channels change).
_RESNET_LAYERS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
# BasicTransformerBlock tensors: the same name on both sides.
_TRANSFORMER_BLOCK_TENSORS = (
    *(f"{norm}.{wb}" for norm in ("norm1", "norm2", "norm3") for wb in WEIGHT_BIAS),
    *(f"{attn}.{proj}.weight" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")),
    *(f"{attn}.to_out.0.{wb}" for attn in ("attn1", "attn2") for wb in WEIGHT_BIAS),
    *(f"ff.net.0.proj.{wb}" for wb in WEIGHT_BIAS),
    *(f"ff.net.2.{wb}" for wb in WEIGHT_BIAS),
)


def _resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> Iterator[KeyRule]:
    shortcut = "skip_connection" if in_channels != out_channels else None
    return resnet_rules(ldm, diffusers, _RESNET_LAYERS, shortcut)


def _transformer(ldm: str, diffusers: str, linear: bool, depth: int) -> Iterator[KeyRule]:
    """A SpatialTransformer / Transformer2DModel; ``linear``: proj_in/out are Linear (SD 2)."""
    projection = Transform.LINEAR if linear else Transform.RENAME
    yield from layer_rules(f"{ldm}.norm", f"{diffusers}.norm")
    yield from layer_rules(f"{ldm}.proj_in", f"{diffusers}.proj_in", projection)
    for block in range(depth):
        for name in _TRANSFORMER_BLOCK_TENSORS:
            tensor = f"transformer_blocks.{block}.{name}"
            yield KeyRule(f"{ldm}.{tensor}", (f"{diffusers}.{tensor}",))
    yield from layer_rules(f"{ldm}.proj_out", f"{diffusers}.proj_out", projection)


def _per_level(value: Any, levels: int, name: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * levels
    if len(values) != levels or not all(isinstance(v, int) for v in values):
        raise ModelFolderError(f"UNet config: {name}={value!r} is not an int or one int per level")
    return values


_REQUIRED = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types")


def _check_config(config: Mapping[str, Any]) -> None:
    absent = [key for key in _REQUIRED if key not in config]
    if absent:
        raise ModelFolderError(f"UNet config: no {', '.join(absent)}")
    down = tuple(config["down_block_types"])
    up = tuple(config["up_block_types"])
    unsupported = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if unsupported or len(down) != len(up):
        raise ModelFolderError(
            f"UNet config: block types {down} / {up} are not a Stable Diffusion 1.x / 2.x UNet"
        )
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    extra = [k for k in ("class_embed_type", "addition_embed_type") if config.get(k) is not None]
    if mid != "UNetMidBlock2DCrossAttn" or extra:
        raise ModelFolderError(
            f"UNet config: {mid} / {', '.join(extra) or 'no extra embedding'} is not a Stable Diffusion "
            "1.x / 2.x UNet"
        )
    if not isinstance(config["layers_per_block"], int):
        raise ModelFolderError(f"UNet config: layers_per_block={config['layers_per_block']!r} is not an int")


def unet_rules(config: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX) -> list[KeyRule]:
    """One rule per tensor of the ``UNet2DConditionModel`` that ``config`` (a diffusers UNet config:
    ``block_out_channels``, ``layers_per_block``, ``down_block_types``, ``up_block_types``,
    ``use_linear_projection``, ``transformer_layers_per_block``) builds, LDM names under ``prefix``.

    Every tensor is a plain rename except SD 2's Linear ``proj_in`` / ``proj_out``, which also
    accept a (C, C, 1, 1) conv weight. Raises ModelFolderError (one line) for a config that is not
    an SD 1.x / 2.x UNet (other block types, class or added embeddings, a per-level layer count).
    """
    _check_config(config)
    channels = tuple(int(c) for c in config["block_out_channels"])
    levels = len(channels)
    per_block = int(config["layers_per_block"])
    linear = bool(config.get("use_linear_projection", False))
    depths = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    down_attn = [t == "CrossAttnDownBlock2D" for t in config["down_block_types"]]
    up_attn = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
    p = prefix
    rules = [
        *layer_rules(f"{p}time_embed.0", "time_embedding.linear_1"),
        *layer_rules(f"{p}time_embed.2", "time_embedding.linear_2"),
        *layer_rules(f"{p}input_blocks.0.0", "conv_in"),
    ]
    for i, out_ch in enumerate(channels):
        in_ch = channels[max(i - 1, 0)]
        for j in range(per_block):
            n = 1 + i * (per_block + 1) + j
            block = f"down_blocks.{i}"
            rules += _resnet(
                f"{p}input_blocks.{n}.0", f"{block}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch
            )
            if down_attn[i]:
                rules += _transformer(f"{p}input_blocks.{n}.1", f"{block}.attentions.{j}", linear, depths[i])
        if i < levels - 1:
            n = 1 + i * (per_block + 1) + per_block
            rules += layer_rules(f"{p}input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    mid = channels[-1]
    rules += _resnet(f"{p}middle_block.0", "mid_block.resnets.0", mid, mid)
    rules += _transformer(f"{p}middle_block.1", "mid_block.attentions.0", linear, depths[-1])
    rules += _resnet(f"{p}middle_block.2", "mid_block.resnets.1", mid, mid)
    reversed_channels = channels[::-1]
    reversed_depths = depths[::-1]
    for i, out_ch in enumerate(reversed_channels):
        prev_ch = reversed_channels[max(i - 1, 0)]
        skip_in = reversed_channels[min(i + 1, levels - 1)]
        for j in range(per_block + 1):
            m = i * (per_block + 1) + j
            block = f"up_blocks.{i}"
            res_in = (prev_ch if j == 0 else out_ch) + (skip_in if j == per_block else out_ch)
            rules += _resnet(f"{p}output_blocks.{m}.0", f"{block}.resnets.{j}", res_in, out_ch)
            if up_attn[i]:
                rules += _transformer(
                    f"{p}output_blocks.{m}.1", f"{block}.attentions.{j}", linear, reversed_depths[i]
                )
        if i < levels - 1:
            m = i * (per_block + 1) + per_block
            slot = 2 if up_attn[i] else 1
            rules += layer_rules(f"{p}output_blocks.{m}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    rules += layer_rules(f"{p}out.0", "conv_norm_out")
    rules += layer_rules(f"{p}out.2", "conv_out")
    return rules
