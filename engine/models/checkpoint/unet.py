"""Key map of a Stable Diffusion 1.x / 2.x / XL UNet between the LDM checkpoint layout and diffusers.

LDM (CompVis ``openaimodel.UNetModel``, what A1111 / ComfyUI checkpoints hold under
``model.diffusion_model.``) numbers its blocks flat; diffusers nests them per resolution level:

==========================================  ==============================================
LDM                                         diffusers ``UNet2DConditionModel``
==========================================  ==============================================
``time_embed.0`` / ``.2``                   ``time_embedding.linear_1`` / ``linear_2``
``label_emb.0.0`` / ``.0.2`` (SDXL)         ``add_embedding.linear_1`` / ``linear_2``
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

SDXL (Stability's generative-models ``UNetModel``, the same names) has three levels, attention at
the two lower-resolution ones, a transformer depth per level (1, 2, 10 in diffusers' config for
SDXL base; the first level has no attention) and the "text_time" added conditioning: ``label_emb``
embeds the pooled text embedding joined with the six size numbers. :func:`transformer_depths`
reads the depths a config states, :func:`depths_from_keys` the depths a checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
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
    """A SpatialTransformer / Transformer2DModel of ``depth`` blocks; ``linear``: proj_in/out are
    Linear (SD 2, SDXL)."""
    projection = Transform.LINEAR if linear else Transform.RENAME
    yield from layer_rules(f"{ldm}.norm", f"{diffusers}.norm")
    yield from layer_rules(f"{ldm}.proj_in", f"{diffusers}.proj_in", projection)
    for block in range(depth):
        for name in _TRANSFORMER_BLOCK_TENSORS:
            tensor = f"transformer_blocks.{block}.{name}"
            yield KeyRule(f"{ldm}.{tensor}", (f"{diffusers}.{tensor}",))
    yield from layer_rules(f"{ldm}.proj_out", f"{diffusers}.proj_out", projection)


_REQUIRED = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types")
# SDXL's added conditioning: these config keys must be ints (diffusers builds add_embedding from them).
_TEXT_TIME_KEYS = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")


def _check_config(config: Mapping[str, Any]) -> None:
    absent = [key for key in _REQUIRED if key not in config]
    if absent:
        raise ModelFolderError(f"UNet config: no {', '.join(absent)}")
    down = tuple(config["down_block_types"])
    up = tuple(config["up_block_types"])
    unsupported = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if unsupported or len(down) != len(up):
        raise ModelFolderError(
            f"UNet config: block types {down} / {up} are not a Stable Diffusion 1.x / 2.x / XL UNet"
        )
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    added = config.get("addition_embed_type")
    extra = [f"{k}={config[k]!r}" for k in ("class_embed_type",) if config.get(k) is not None]
    extra += [f"addition_embed_type={added!r}"] if added not in (None, "text_time") else []
    if mid != "UNetMidBlock2DCrossAttn" or extra:
        raise ModelFolderError(
            f"UNet config: {mid} / {', '.join(extra) or 'no extra embedding'} is not a Stable Diffusion "
            "1.x / 2.x / XL UNet"
        )
    if added == "text_time":
        bad = [k for k in _TEXT_TIME_KEYS if not isinstance(config.get(k), int)]
        if bad:
            raise ModelFolderError(
                f"UNet config: text_time added conditioning without an int {', '.join(bad)} is not a "
                "Stable Diffusion XL UNet"
            )
    if not isinstance(config["layers_per_block"], int):
        raise ModelFolderError(f"UNet config: layers_per_block={config['layers_per_block']!r} is not an int")


@dataclass(frozen=True)
class TransformerDepths:
    """Transformer blocks per attention layer: ``down[i][j]`` for layer j of down level i, ``mid``, and
    ``up[i][j]`` for layer j of up level i (up levels lowest resolution first, as diffusers numbers
    them). Levels without attention hold the config's number, which builds nothing."""

    down: tuple[tuple[int, ...], ...]
    mid: int
    up: tuple[tuple[int, ...], ...]


def _per_layer(value: Any, layers: int, name: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * layers
    if len(values) != layers or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ModelFolderError(f"UNet config: {name} entry {value!r} is not an int or one int per layer")
    return values


def transformer_depths(config: Mapping[str, Any]) -> TransformerDepths:
    """The depths diffusers' ``UNet2DConditionModel`` builds from ``transformer_layers_per_block`` (an
    int, one per level, or per level one per layer) and ``reverse_transformer_layers_per_block`` (the
    up levels', default the down levels' reversed); the mid block takes the last level's (first) one.
    One-line ModelFolderError for a value of another form."""
    levels, per_block = len(config["block_out_channels"]), int(config["layers_per_block"])
    name = "transformer_layers_per_block"
    value = config.get(name, 1)
    per_level = list(value) if isinstance(value, list | tuple) else [value] * levels
    if len(per_level) != levels:
        raise ModelFolderError(f"UNet config: {name}={value!r} is not an int or one entry per level")
    down = tuple(_per_layer(v, per_block, name) for v in per_level)
    reverse = config.get("reverse_" + name)
    up_levels = per_level[::-1] if reverse is None else list(reverse)
    if len(up_levels) != levels:
        raise ModelFolderError(f"UNet config: reverse_{name}={reverse!r} is not one entry per level")
    up = tuple(_per_layer(v, per_block + 1, "reverse_" + name) for v in up_levels)
    return TransformerDepths(down, down[-1][0], up)


def _count_blocks(names: Container[str], transformer: str) -> int:
    count = 0
    while f"{transformer}.transformer_blocks.{count}.norm1.weight" in names:
        count += 1
    return count


def depths_from_keys(
    names: Container[str], config: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX
) -> dict[str, Any]:
    """The ``transformer_layers_per_block`` (and, for a file whose up levels are not the down levels
    mirrored, ``reverse_transformer_layers_per_block``) of the UNet a checkpoint holds, counted from
    its ``transformer_blocks.N`` tensor ``names`` at the attention layers ``config``'s block types
    place; {} when the file's depths have no diffusers form or an attention layer has no block (the
    key-map check then names what does not fit)."""
    _check_config(config)
    per_block, stated = int(config["layers_per_block"]), transformer_depths(config)

    def level(
        blocks: str, first: int, layers: int, attention: bool, default: tuple[int, ...]
    ) -> tuple[int, ...]:
        if not attention:
            return default
        return tuple(_count_blocks(names, f"{prefix}{blocks}.{first + j}.1") for j in range(layers))

    down = tuple(
        level(
            "input_blocks", 1 + i * (per_block + 1), per_block, kind == "CrossAttnDownBlock2D", stated.down[i]
        )
        for i, kind in enumerate(config["down_block_types"])
    )
    up = tuple(
        level("output_blocks", i * (per_block + 1), per_block + 1, kind == "CrossAttnUpBlock2D", stated.up[i])
        for i, kind in enumerate(config["up_block_types"])
    )
    if (
        0 in {d for lv in (*down, *up) for d in lv}
        or _count_blocks(names, f"{prefix}middle_block.1") != down[-1][0]
    ):
        return {}
    if all(len(set(lv)) == 1 for lv in (*down, *up)) and [lv[0] for lv in up] == [lv[0] for lv in down[::-1]]:
        return {"transformer_layers_per_block": [lv[0] for lv in down]}
    return {
        "transformer_layers_per_block": [list(lv) for lv in down],
        "reverse_transformer_layers_per_block": [list(lv) for lv in up],
    }


def unet_rules(config: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX) -> list[KeyRule]:
    """One rule per tensor of the ``UNet2DConditionModel`` that ``config`` (a diffusers UNet config:
    ``block_out_channels``, ``layers_per_block``, ``down_block_types``, ``up_block_types``,
    ``use_linear_projection``, ``transformer_layers_per_block`` and its reverse, ``addition_embed_type``)
    builds, LDM names under ``prefix``.

    Every tensor is a plain rename except SD 2 / SDXL's Linear ``proj_in`` / ``proj_out``, which also
    accept a (C, C, 1, 1) conv weight. Raises ModelFolderError (one line) for a config that is not
    an SD 1.x / 2.x / XL UNet (other block types, class or other added embeddings, a per-level layer
    count).
    """
    _check_config(config)
    depths = transformer_depths(config)
    linear = bool(config.get("use_linear_projection", False))
    p = prefix
    rules = [
        *layer_rules(f"{p}time_embed.0", "time_embedding.linear_1"),
        *layer_rules(f"{p}time_embed.2", "time_embedding.linear_2"),
    ]
    if config.get("addition_embed_type") == "text_time":
        rules += layer_rules(f"{p}label_emb.0.0", "add_embedding.linear_1")
        rules += layer_rules(f"{p}label_emb.0.2", "add_embedding.linear_2")
    rules += layer_rules(f"{p}input_blocks.0.0", "conv_in")
    rules += _down_rules(config, depths.down, linear, p)
    mid = int(config["block_out_channels"][-1])
    rules += _resnet(f"{p}middle_block.0", "mid_block.resnets.0", mid, mid)
    rules += _transformer(f"{p}middle_block.1", "mid_block.attentions.0", linear, depths.mid)
    rules += _resnet(f"{p}middle_block.2", "mid_block.resnets.1", mid, mid)
    rules += _up_rules(config, depths.up, linear, p)
    rules += layer_rules(f"{p}out.0", "conv_norm_out")
    rules += layer_rules(f"{p}out.2", "conv_out")
    return rules


def _down_rules(
    config: Mapping[str, Any], depths: tuple[tuple[int, ...], ...], linear: bool, p: str
) -> Iterator[KeyRule]:
    """``input_blocks.N`` (N >= 1): each level's ResNets and attentions, then its downsampler."""
    channels = tuple(int(c) for c in config["block_out_channels"])
    per_block = int(config["layers_per_block"])
    for i, out_ch in enumerate(channels):
        in_ch, block = channels[max(i - 1, 0)], f"down_blocks.{i}"
        attention = config["down_block_types"][i] == "CrossAttnDownBlock2D"
        for j in range(per_block):
            n = 1 + i * (per_block + 1) + j
            yield from _resnet(
                f"{p}input_blocks.{n}.0", f"{block}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch
            )
            if attention:
                yield from _transformer(
                    f"{p}input_blocks.{n}.1", f"{block}.attentions.{j}", linear, depths[i][j]
                )
        if i < len(channels) - 1:
            n = 1 + i * (per_block + 1) + per_block
            yield from layer_rules(f"{p}input_blocks.{n}.0.op", f"{block}.downsamplers.0.conv")


def _up_rules(
    config: Mapping[str, Any], depths: tuple[tuple[int, ...], ...], linear: bool, p: str
) -> Iterator[KeyRule]:
    """``output_blocks.M``: each up level's ResNets (input: the previous output joined with a skip)
    and attentions, then its upsampler (slot 2 after an attention, else 1)."""
    channels = tuple(int(c) for c in config["block_out_channels"])[::-1]
    per_block, levels = int(config["layers_per_block"]), len(channels)
    for i, out_ch in enumerate(channels):
        prev_ch, skip_in = channels[max(i - 1, 0)], channels[min(i + 1, levels - 1)]
        block = f"up_blocks.{i}"
        attention = config["up_block_types"][i] == "CrossAttnUpBlock2D"
        for j in range(per_block + 1):
            m = i * (per_block + 1) + j
            res_in = (prev_ch if j == 0 else out_ch) + (skip_in if j == per_block else out_ch)
            yield from _resnet(f"{p}output_blocks.{m}.0", f"{block}.resnets.{j}", res_in, out_ch)
            if attention:
                yield from _transformer(
                    f"{p}output_blocks.{m}.1", f"{block}.attentions.{j}", linear, depths[i][j]
                )
        if i < levels - 1:
            m = i * (per_block + 1) + per_block
            yield from layer_rules(
                f"{p}output_blocks.{m}.{2 if attention else 1}.conv", f"{block}.upsamplers.0.conv"
            )
