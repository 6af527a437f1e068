"""Key maps of the SD 1.x / 2.x / XL text encoders between single-file checkpoints and transformers.

Targets are the names of transformers' ``CLIPTextModel`` state dict. transformers 5 (from 5.6) has no
``text_model.`` level in them, older versions do: :func:`text_model_prefix` asks the built model, and
the rule functions take the answer as ``target_prefix``.

SD 1.x (OpenAI CLIP ViT-L/14) checkpoints store the transformers model itself under
``cond_stage_model.transformer.``: names are the same on both sides, and files written with
transformers before and after 4.21 differ in a ``text_model.`` level after ``transformer.``; both are in
the wild (:func:`clip_checkpoint_prefix` tells which a file has).

SD 2.x (OpenCLIP ViT-H/14) checkpoints store open_clip's ``TextTransformer`` under
``cond_stage_model.model.``:

==============================================  ==================================================
OpenCLIP                                        transformers ``CLIPTextModel``
==============================================  ==================================================
``token_embedding.weight``                      ``embeddings.token_embedding.weight``
``positional_embedding``                        ``embeddings.position_embedding.weight``
``transformer.resblocks.N.ln_1`` / ``ln_2``     ``encoder.layers.N.layer_norm1`` / ``layer_norm2``
``transformer.resblocks.N.attn.in_proj_*``      ``encoder.layers.N.self_attn.{q,k,v}_proj.*`` (split)
``transformer.resblocks.N.attn.out_proj``       ``encoder.layers.N.self_attn.out_proj``
``transformer.resblocks.N.mlp.c_fc`` / ``c_proj``  ``encoder.layers.N.mlp.fc1`` / ``fc2``
``ln_final``                                    ``final_layer_norm``
``text_projection`` (H, P), applied as x @ P    ``text_projection.weight`` (P, H) (SDXL, transposed)
==============================================  ==================================================

``in_proj_weight`` (3H, H) stacks q, k, v in that order (``torch.nn.MultiheadAttention``'s layout).
ViT-H has 24 blocks; SD 2 conditions on the penultimate layer, so its text encoder config has 23 and
the 24th block is stored but never run; ``text_projection`` and ``logit_scale`` (CLIP's contrastive
head) are never run either (:func:`openclip_unused_keys`). The same correspondence as diffusers'
``convert_open_clip_checkpoint`` (diffusers/loaders/single_file_utils.py), stated here as data.

SDXL (Stability's generative-models ``GeneralConditioner``) keeps both encoders under
``conditioner.embedders.``: ``0.transformer.`` is CLIP ViT-L/14 as in SD 1 (transformers names),
``1.model.`` OpenCLIP ViT-bigG/14 as in SD 2, but all 32 blocks run (the pipeline takes the
penultimate hidden states itself) and ``text_projection`` is used: it gives the pooled embedding
the UNet's added conditioning takes, so it maps onto ``CLIPTextModelWithProjection``
(:func:`xl_openclip_rules`); only ``logit_scale`` is unused (:func:`xl_openclip_unused_keys`). The
refiner's single encoder, bigG under ``conditioner.embedders.0.model.``, has no rules here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import nn

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import WEIGHT_BIAS, KeyRule, Transform

CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
XL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner's bigG (no CLIP-L)
PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's, outside text_model.
TEXT_MODEL = "text_model."
# CLIP encoder-layer tensors, transformers names (identical in SD 1 checkpoints).
_CLIP_LAYER_TENSORS = (
    *(f"self_attn.{proj}.{wb}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for wb in WEIGHT_BIAS),
    *(f"{norm}.{wb}" for norm in ("layer_norm1", "layer_norm2") for wb in WEIGHT_BIAS),
    *(f"mlp.{fc}.{wb}" for fc in ("fc1", "fc2") for wb in WEIGHT_BIAS),
)
# OpenCLIP block tensors that are plain renames: OpenCLIP name -> transformers name.
_OPENCLIP_RENAMES = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def _num_layers(config: Mapping[str, Any]) -> int:
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ModelFolderError(f"text encoder config: num_hidden_layers={layers!r} is not a positive int")
    return layers


def clip_tensor_names(config: Mapping[str, Any]) -> Iterator[str]:
    """The learned tensors of a ``CLIPTextModel`` for ``config`` (a CLIPTextConfig dict), without the
    ``text_model.`` level; ``embeddings.position_ids`` is a buffer the model builds, not a weight."""
    yield "embeddings.token_embedding.weight"
    yield "embeddings.position_embedding.weight"
    for layer in range(_num_layers(config)):
        for tensor in _CLIP_LAYER_TENSORS:
            yield f"encoder.layers.{layer}.{tensor}"
    yield from (f"final_layer_norm.{wb}" for wb in WEIGHT_BIAS)


def clip_rules(
    config: Mapping[str, Any], prefix: str = CLIP_PREFIX, target_prefix: str = ""
) -> list[KeyRule]:
    """SD 1.x: one rename per tensor, checkpoint name ``prefix + name``, model name ``target_prefix +
    name``. ``prefix`` is where the file keeps the transformers names: ``cond_stage_model.transformer.``
    or ``cond_stage_model.transformer.text_model.`` (:func:`clip_checkpoint_prefix`)."""
    return [KeyRule(prefix + name, (target_prefix + name,)) for name in clip_tensor_names(config)]


def clip_checkpoint_prefix(keys: Iterable[str], prefix: str = CLIP_PREFIX) -> str:
    """Where a checkpoint's CLIP names start: ``prefix + "text_model."`` (transformers >= 4.21 wrote
    that level) or ``prefix`` alone (older files). ModelFolderError if the file mixes both."""
    under = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
    with_level = sum(name.startswith(TEXT_MODEL) for name in under)
    if with_level and with_level != len(under):
        odd = next(name for name in under if not name.startswith(TEXT_MODEL))
        raise ModelFolderError(
            f"text encoder: the checkpoint mixes names with and without '{prefix}{TEXT_MODEL}' "
            f"(e.g. '{prefix}{odd}')"
        )
    return prefix + TEXT_MODEL if with_level else prefix


def clip_unused_keys(prefix: str) -> frozenset[str]:
    """Stored but not weights: the ``position_ids`` buffer (0..76, which the model rebuilds; merged
    checkpoints often hold it as rounded floats, so it is never read)."""
    return frozenset({f"{prefix}embeddings.position_ids"})


def openclip_rules(
    config: Mapping[str, Any], prefix: str = OPENCLIP_PREFIX, target_prefix: str = ""
) -> list[KeyRule]:
    """SD 2.x: the OpenCLIP names under ``prefix`` (table in the module docstring) for the
    ``num_hidden_layers`` blocks the config runs; ``in_proj_weight`` (3H, H) / ``in_proj_bias`` (3H,)
    split into q, k, v (:attr:`Transform.SPLIT_QKV`)."""
    t = target_prefix
    rules = [
        KeyRule(f"{prefix}token_embedding.weight", (f"{t}embeddings.token_embedding.weight",)),
        KeyRule(f"{prefix}positional_embedding", (f"{t}embeddings.position_embedding.weight",)),
    ]
    for layer in range(_num_layers(config)):
        block, target = f"{prefix}transformer.resblocks.{layer}", f"{t}encoder.layers.{layer}"
        for wb in WEIGHT_BIAS:
            qkv = tuple(f"{target}.self_attn.{proj}.{wb}" for proj in ("q_proj", "k_proj", "v_proj"))
            rules.append(KeyRule(f"{block}.attn.in_proj_{wb}", qkv, Transform.SPLIT_QKV))
            rules += [
                KeyRule(f"{block}.{old}.{wb}", (f"{target}.{new}.{wb}",)) for old, new in _OPENCLIP_RENAMES
            ]
    rules += [KeyRule(f"{prefix}ln_final.{wb}", (f"{t}final_layer_norm.{wb}",)) for wb in WEIGHT_BIAS]
    return rules


def openclip_unused_keys(
    config: Mapping[str, Any], keys: Iterable[str], prefix: str = OPENCLIP_PREFIX
) -> frozenset[str]:
    """Stored but never run: CLIP's contrastive head (``text_projection``, ``logit_scale``) and the one
    block after the last the config runs (ViT-H's 24th when SD 2 runs 23: it conditions on the
    penultimate layer). Any other extra block is not allowed for: a config with too few layers."""
    extra_block = f"{prefix}transformer.resblocks.{_num_layers(config)}."
    named = {f"{prefix}text_projection", f"{prefix}logit_scale"}
    return frozenset(key for key in keys if key in named or key.startswith(extra_block))


def xl_openclip_rules(
    config: Mapping[str, Any], prefix: str = XL_OPENCLIP_PREFIX, target_prefix: str = ""
) -> list[KeyRule]:
    """SDXL's second encoder: :func:`openclip_rules` for all ``num_hidden_layers`` blocks, and
    ``text_projection`` (H, P) transposed into the (P, H) Linear weight ``text_projection.weight``."""
    projection = KeyRule(f"{prefix}text_projection", (PROJECTION,), Transform.TRANSPOSE)
    return [*openclip_rules(config, prefix, target_prefix), projection]


def xl_openclip_unused_keys(keys: Iterable[str], prefix: str = XL_OPENCLIP_PREFIX) -> frozenset[str]:
    """Stored but never run by SDXL's second encoder: CLIP's contrastive temperature ``logit_scale``."""
    return frozenset({f"{prefix}logit_scale"}) & set(keys)


def text_model_prefix(model: nn.Module) -> str:
    """``"text_model."`` when the built ``CLIPTextModel`` names its tensors under that level
    (transformers < 5.6; ``CLIPTextModelWithProjection`` still does), else ``""``: what
    :func:`clip_rules` / :func:`openclip_rules` take as ``target_prefix``."""
    return TEXT_MODEL if any(name.startswith(TEXT_MODEL) for name in model.state_dict()) else ""
