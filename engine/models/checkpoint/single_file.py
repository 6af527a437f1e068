"""Single-file Stable Diffusion 1.x / 2.x / XL checkpoints (A1111 / ComfyUI ``.safetensors`` or ``.ckpt``).

A checkpoint holds the whole LDM model in one flat dict: the UNet under ``model.diffusion_model.``
(plus, in training files, its EMA copy under ``model_ema.`` with the dots of each name removed), the
VAE under ``first_stage_model.``, the text encoder under ``cond_stage_model.transformer.`` (SD 1, CLIP)
or ``cond_stage_model.model.`` (SD 2, OpenCLIP), the DDPM schedule as buffers at the top level, and
optionally the marker keys ``v_pred`` / ``ztsnr``. SDXL base files (Stability's generative-models
layout, as ``sd_xl_base_1.0.safetensors``) keep the same UNet and VAE names (the UNet adds
``label_emb``) and both text encoders under ``conditioner.embedders.``: CLIP ViT-L under ``0.transformer.``
and OpenCLIP ViT-bigG under ``1.model.`` (:mod:`.text`). No config and no tokenizer come with it.

:func:`inspect_checkpoint` reads only names and shapes (a safetensors header; a ``.ckpt`` is
memory-mapped by ``torch.load(weights_only=True)``) and decides everything before any weight is loaded:

- the family from the text encoders' layout: "sd1", "sd2" or "sdxl"; an SDXL refiner, inpainting and
  other UNet inputs, LoRAs, a VAE alone or anything else are refused in one line saying what the file
  looks like;
- the architecture: the project's ``sd15`` / ``sd21`` / ``sdxl`` presets (SDXL's transformer depths
  read from the file, :func:`engine.models.checkpoint.unet.depths_from_keys`), or ``config_dir`` (a
  diffusers folder whose configs and tokenizers describe it, as diffusers' ``from_single_file(config=...)``);
- the key map (:mod:`.unet`, :mod:`.vae`, :mod:`.text`): every tensor's shape is checked against the
  config, and any checkpoint tensor left unused or any model tensor left missing is an error naming the
  first few, except the allow-list :func:`allowed_unused` documents;
- the prediction type, by the first of: the explicit option; a ``v_pred`` marker key; a
  ``<checkpoint>.yaml`` beside the file (A1111's convention); ``config_dir``'s scheduler config; for
  SD 2 the probe of :func:`probe_output_shift`; else epsilon (SD 1, SDXL).
  ``Checkpoint.prediction_source`` says which ("option", "marker v_pred", "yaml", "config_dir",
  "probe", "default").

:func:`load_checkpoint` then builds the float32 torch modules, reading one tensor at a time.
Export side only: imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import KeyRule, apply_rules
from engine.models.checkpoint.tensors import (
    Float32Tensors,
    MetaTensors,
    TensorFile,
    first_names,
    one_line,
    open_tensors,
)
from engine.models.checkpoint.text import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPENCLIP_PREFIX,
    XL_REFINER_PREFIX,
    clip_checkpoint_prefix,
    clip_rules,
    clip_unused_keys,
    openclip_rules,
    openclip_unused_keys,
    text_model_prefix,
    xl_openclip_rules,
    xl_openclip_unused_keys,
)
from engine.models.checkpoint.unet import LDM_UNET_PREFIX, depths_from_keys, unet_rules
from engine.models.checkpoint.vae import LDM_VAE_PREFIX, VaeAttention, vae_attention, vae_rules
from engine.models.folder import TEXT_ENCODERS, check_tokenizer, read_json
from engine.models.source import PREDICTION_TYPES, SourceOptions
from engine.models.torch_modules import SourceModel, build_module, load_vae, meta_module

FAMILY_PRESETS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = frozenset({"model_ema.decay", "model_ema.num_updates"})
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
# LDM's DDPM registers its noise schedule as buffers; the engine computes it from the scheduler config.
DDPM_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "denoiser.sigmas",  # generative-models' (SDXL training code) DiscreteDenoiser sigma table
    }
)
# Training-only parts of an LDM AutoencoderKL (LPIPS and discriminator), never run at inference.
VAE_LOSS_PREFIX = LDM_VAE_PREFIX + "loss."
UNET_INPUT_KEY = LDM_UNET_PREFIX + "input_blocks.0.0.weight"
SDXL_PREFIX = "conditioner.embedders."
# A1111's SD 2 v-prediction probe (see probe_output_shift).
PROBE_TIMESTEP = 999
PROBE_VALUE = 0.5
PROBE_THRESHOLD = -1.0
_DEFAULT_OPTIONS = SourceOptions()


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a checkpoint keeps each network, as far as names differ between files."""

    text_prefix: str  # "cond_stage_model.transformer.[text_model.]" (CLIP) or "cond_stage_model.model."
    openclip: bool  # SD 2's OpenCLIP names (else transformers' CLIP names)
    baked_vae: bool  # the file has a VAE (first_stage_model.*)
    vae_attention: VaeAttention | None  # the baked VAE's attention spelling; None: it is not loaded
    # SDXL: the second (OpenCLIP bigG) encoder's prefix, "conditioner.embedders.1.model."; text_prefix
    # is then "conditioner.embedders.0.transformer.[text_model.]" (CLIP ViT-L). None for SD 1.x / 2.x.
    text_2_prefix: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A validated single-file checkpoint, ready for :func:`load_checkpoint`.

    configs: diffusers configs "unet", "vae", "text_encoder" (a CLIPTextConfig dict), SDXL's
    "text_encoder_2" (a CLIPTextConfig dict for a CLIPTextModelWithProjection) and "scheduler" (with
    ``prediction_type``; ``_class_name`` the preset's). tokenizer_dir / tokenizer_2_dir: config_dir's
    tokenizer/ and tokenizer_2/, or None for the bundled CLIP BPE (SD 2 and SDXL's second tokenizer pad
    with "!"). vae_source: the VAE that replaces the baked one. notes: what was decided, one log line each.
    """

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str
    prediction_source: str
    ema: bool
    configs: dict[str, dict[str, Any]]
    tokenizer_dir: Path | None
    vae_source: Path | None
    notes: tuple[str, ...]
    layout: CheckpointLayout = field(repr=False)
    tokenizer_2_dir: Path | None = None  # SDXL's second tokenizer folder, like tokenizer_dir


# --- what the file is -----------------------------------------------------------------------------


def ema_key(name: str) -> str:
    """The EMA copy's name of a UNet tensor: LDM's LitEma drops the dots,
    ``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``."""
    return EMA_PREFIX + name.removeprefix("model.").replace(".", "")


def detect_family(path: Path, shapes: Mapping[str, tuple[int, ...]], ema: bool = False) -> str:
    """The family, "sd1" (``cond_stage_model.transformer.*``), "sd2" (``cond_stage_model.model.*``) or
    "sdxl" (``conditioner.embedders.0.transformer.*`` and ``conditioner.embedders.1.model.*``), from the
    tensor names and the UNet input's shape; anything else raises ModelFolderError saying what the file
    looks like (an SDXL refiner or another conditioner layout, inpainting or another UNet input, LoRA,
    VAE alone, ControlNet, a diffusers component, UNet without text encoder, unknown)."""
    keys = list(shapes)
    name = path.name
    has_unet = any(k.startswith(LDM_UNET_PREFIX) for k in keys)
    has_ema = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in keys)
    if not has_unet and not has_ema:
        raise ModelFolderError(f"{name}: {_what_it_looks_like(keys)}")
    input_key = ema_key(UNET_INPUT_KEY) if ema or not has_unet else UNET_INPUT_KEY
    channels = shapes[input_key][1] if input_key in shapes and len(shapes[input_key]) == 4 else 4
    if channels == 9:
        raise ModelFolderError(
            f"{name}: an inpainting checkpoint (9-channel UNet input); "
            "inpainting checkpoints are not supported yet"
        )
    if channels != 4:
        raise ModelFolderError(
            f"{name}: a {channels}-channel UNet input (a depth, instruct-pix2pix or other conditioned "
            "model); only 4-channel text-to-image checkpoints are supported yet"
        )
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        return _xl_family(name, keys)
    clip = any(k.startswith(CLIP_PREFIX) for k in keys)
    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in keys)
    if clip and openclip:
        raise ModelFolderError(f"{name}: holds both a CLIP (SD 1) and an OpenCLIP (SD 2) text encoder")
    if not clip and not openclip:
        raise ModelFolderError(
            f"{name}: a UNet without a text encoder (no cond_stage_model.* or conditioner.* keys); not a "
            "full SD 1.x / 2.x / XL checkpoint"
        )
    return "sd2" if openclip else "sd1"


def _xl_family(name: str, keys: list[str]) -> str:
    """SDXL base's two encoders give "sdxl"; the refiner (bigG alone as embedders.0) and any other
    conditioner layout are refused, naming the embedders found."""
    if any(k.startswith(XL_REFINER_PREFIX) for k in keys):
        raise ModelFolderError(
            f"{name}: an SDXL refiner checkpoint (OpenCLIP bigG alone under '{XL_REFINER_PREFIX}'); "
            "SDXL refiner checkpoints are not supported"
        )
    if any(k.startswith(XL_CLIP_PREFIX) for k in keys) and any(
        k.startswith(XL_OPENCLIP_PREFIX) for k in keys
    ):
        return "sdxl"
    found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith(SDXL_PREFIX)})
    raise ModelFolderError(
        f"{name}: an unknown SDXL-style conditioner ({first_names(found)}); an SDXL base checkpoint has "
        f"CLIP ViT-L under '{XL_CLIP_PREFIX}' and OpenCLIP bigG under '{XL_OPENCLIP_PREFIX}'"
    )


def _what_it_looks_like(keys: list[str]) -> str:
    """What a file without a UNet is, for the error that refuses it."""
    if not keys:
        return "holds no tensors"
    lora = [k for k in keys if k.startswith(("lora_", "lycoris_")) or ".lora_" in k or ".lora_A." in k]
    if lora:
        return (
            f"looks like a LoRA ({len(lora)} keys like '{lora[0]}'), not a full checkpoint; "
            "LoRAs are not supported yet"
        )
    vae_parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", LDM_VAE_PREFIX)
    if all(k.startswith((*vae_parts, "model_ema.", "loss.")) for k in keys):
        return "looks like a VAE alone (no UNet); pass it as the VAE (--vae) beside a full checkpoint"
    if any(k.startswith("control_model.") for k in keys):
        return "looks like a ControlNet, not a Stable Diffusion checkpoint; ControlNets are not supported yet"
    diffusers = ("down_blocks.", "time_embedding.", "text_model.", "encoder.layers.", "embeddings.")
    if any(k.startswith(diffusers) for k in keys):
        return (
            "looks like one network of a diffusers model folder (keys like "
            f"'{next(k for k in keys if k.startswith(diffusers))}'); export the whole folder instead"
        )
    listed = first_names(sorted(keys))
    return f"not a Stable Diffusion checkpoint (no model.diffusion_model.* keys; it has {listed})"


def _layout(path: Path, keys: list[str], family: str, options: SourceOptions) -> CheckpointLayout:
    has_unet = any(k.startswith(LDM_UNET_PREFIX) for k in keys)
    has_ema = any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in keys)
    if options.ema and not has_ema:
        raise ModelFolderError(
            f"{path.name}: EMA weights were asked for (--ema) but the file has none (no model_ema.* keys)"
        )
    if not options.ema and not has_unet:
        raise ModelFolderError(
            f"{path.name}: holds only the EMA UNet weights (model_ema.*); pass --ema to use them"
        )
    has_vae = any(k.startswith(LDM_VAE_PREFIX) and not k.startswith(VAE_LOSS_PREFIX) for k in keys)
    if not has_vae and options.vae is None:
        raise ModelFolderError(
            f"{path.name}: the checkpoint has no VAE (no first_stage_model.* keys); pass one with --vae "
            "(e.g. vae-ft-mse-840000-ema-pruned.safetensors)"
        )
    openclip, xl = family == "sd2", family == "sdxl"
    if openclip:
        text_prefix = OPENCLIP_PREFIX
    else:
        text_prefix = clip_checkpoint_prefix(keys, XL_CLIP_PREFIX if xl else CLIP_PREFIX)
    return CheckpointLayout(
        text_prefix=text_prefix,
        openclip=openclip,
        baked_vae=has_vae,
        vae_attention=vae_attention(keys) if has_vae and options.vae is None else None,
        text_2_prefix=XL_OPENCLIP_PREFIX if xl else None,
    )


# --- configs ----------------------------------------------------------------------------------------


def preset_configs(family: str) -> dict[str, dict[str, Any]]:
    """The built-in architecture of ``family``: the ``sd15`` / ``sd21`` / ``sdxl`` preset's configs."""
    from engine.models.presets import preset_spec, text_encoder_config

    spec = preset_spec(FAMILY_PRESETS[family])
    return {
        "unet": spec.unet.config(),
        "vae": spec.vae.config(),
        **{name: text_encoder_config(spec, name).to_diff_dict() for name, _, _ in spec.text_encoders()},
        "scheduler": {"_class_name": spec.scheduler.class_name, **spec.scheduler.config()},
    }


def _file_depths(shapes: Mapping[str, tuple[int, ...]], unet: Mapping[str, Any], ema: bool) -> dict[str, Any]:
    """The transformer depths of the UNet the file holds (EMA copy's names when ``ema``), as UNet config
    entries; {} when they have no diffusers form."""
    names: Container[str] = _Renamed(shapes, ema_key) if ema else shapes
    return depths_from_keys(names, unet)


@dataclass(frozen=True)
class _Architecture:
    """The configs that describe a checkpoint, where they came from, and its tokenizer folders."""

    configs: dict[str, dict[str, Any]]
    source: str  # "config folder <name>" or "<preset> preset", for messages
    folder_scheduler: Mapping[str, Any] | None  # the config folder's scheduler config, if any
    tokenizer_dir: Path | None
    tokenizer_2_dir: Path | None
    notes: tuple[str, ...]


def _architecture(
    shapes: Mapping[str, tuple[int, ...]], family: str, options: SourceOptions
) -> _Architecture:
    """``options.config_dir``'s configs and tokenizers, or the family's preset configs (SDXL: with the
    transformer depths the file holds)."""
    if options.config_dir is not None:
        configs, tokenizer, tokenizer_2 = _folder_configs(options.config_dir, family)
        source = f"config folder {options.config_dir.name}"
        return _Architecture(configs, source, configs["scheduler"], tokenizer, tokenizer_2, ())
    configs = preset_configs(family)
    notes: tuple[str, ...] = ()
    if family == "sdxl":
        depths = _file_depths(shapes, configs["unet"], options.ema)
        notes = tuple(note for note in (_depth_note(configs["unet"], depths),) if note)
        configs["unet"].update(depths)
    return _Architecture(configs, f"{FAMILY_PRESETS[family]} preset", None, None, None, notes)


def _depth_note(preset: Mapping[str, Any], depths: Mapping[str, Any]) -> str:
    """A log line when the file's transformer depths are not the preset's ("" when they are)."""
    changed = {k: v for k, v in depths.items() if preset.get(k) != v}
    if not changed:
        return ""
    return "transformer depths read from the file: " + ", ".join(f"{k}={v}" for k, v in changed.items())


class _Renamed(Container[str]):
    """``name in view``: whether ``keys`` holds ``rename(name)`` (the UNet's EMA copy: :func:`ema_key`)."""

    def __init__(self, keys: Container[str], rename: Callable[[str], str]) -> None:
        self._keys = keys
        self._rename = rename

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._rename(name) in self._keys


def _folder_configs(
    config_dir: Path, family: str
) -> tuple[dict[str, dict[str, Any]], Path | None, Path | None]:
    """The configs of a diffusers folder describing the checkpoint, and its tokenizer/ and (SDXL)
    tokenizer_2/ folders, each None when absent (the bundled BPE is used then)."""
    if not config_dir.is_dir():
        what = "is not a folder" if config_dir.exists() else "not found"
        raise ModelFolderError(f"--config {config_dir} {what}: give a diffusers model folder")
    encoders = [name for name in TEXT_ENCODERS if family == "sdxl" or name == "text_encoder"]
    if family == "sdxl" and not (config_dir / "text_encoder_2" / "config.json").is_file():
        raise ModelFolderError(
            f"--config {config_dir}: no text_encoder_2/config.json; an SDXL checkpoint needs an SDXL "
            "diffusers folder"
        )
    files = [("unet", "config.json"), ("vae", "config.json"), *((e, "config.json") for e in encoders)]
    configs = {
        name: read_json(config_dir / name / file, f"config folder {name}")
        for name, file in (*files, ("scheduler", "scheduler_config.json"))
    }
    tokenizers: dict[str, Path] = {}
    for encoder in encoders:
        folder = config_dir / TEXT_ENCODERS[encoder]
        if folder.is_dir():
            check_tokenizer(folder, configs[encoder], encoder)
            tokenizers[encoder] = folder
    return configs, tokenizers.get("text_encoder"), tokenizers.get("text_encoder_2")


# --- the key map and its checks ---------------------------------------------------------------------


def component_rules(
    configs: Mapping[str, Mapping[str, Any]], layout: CheckpointLayout, ema: bool
) -> dict[str, list[KeyRule]]:
    """The key map of each network read from the checkpoint ("text_encoder_2" for SDXL, "vae" only
    when its baked VAE is used); the UNet's LDM names are the EMA copy's when ``ema``. Text encoder
    targets carry ``text_model.`` when the built model names its tensors so (:func:`text_model_prefix`)."""
    unet = _unet_rules(configs["unet"], ema)
    text_config = configs["text_encoder"]
    target = text_model_prefix(meta_module("text_encoder", text_config))
    if layout.openclip:
        text = openclip_rules(text_config, layout.text_prefix, target)
    else:
        text = clip_rules(text_config, layout.text_prefix, target)
    rules = {"unet": unet, "text_encoder": text}
    if layout.text_2_prefix is not None:
        config_2 = configs["text_encoder_2"]
        target_2 = text_model_prefix(meta_module("text_encoder_2", config_2))
        rules["text_encoder_2"] = xl_openclip_rules(config_2, layout.text_2_prefix, target_2)
    if layout.vae_attention is not None:
        rules["vae"] = vae_rules(configs["vae"], LDM_VAE_PREFIX, layout.vae_attention)
    return rules


def allowed_unused(
    keys: list[str],
    configs: Mapping[str, Mapping[str, Any]],
    layout: CheckpointLayout,
    ema: bool,
    vae_given: bool,
) -> frozenset[str]:
    """Checkpoint tensors that are known not to be weights of the networks loaded, so leaving them
    unused is no error:

    - the DDPM schedule buffers at the top level (``betas``, ``alphas_cumprod``, ...: the engine
      computes the schedule from the scheduler config) and the ``v_pred`` / ``ztsnr`` markers;
    - ``model_ema.decay`` / ``num_updates``; the EMA UNet when not using EMA, the plain UNet when using it;
    - the text encoder's ``position_ids`` (SD 1, SDXL's CLIP), or OpenCLIP's ``text_projection``,
      ``logit_scale`` and the one block past the config's last (SD 2: ViT-H's 24th), or SDXL bigG's
      ``logit_scale``;
    - the VAE's training loss (``first_stage_model.loss.*``: LPIPS and discriminator), and the whole
      baked VAE when another VAE replaces it.

    Anything else left over (a LoRA not merged, an unCLIP embedder, a second text encoder on SD 1.x /
    2.x) is an error.
    """
    allowed = {
        k for k in keys if k in DDPM_BUFFERS or k in (V_PRED_MARKER, ZTSNR_MARKER) or k in EMA_BOOKKEEPING
    }
    unused_unet = LDM_UNET_PREFIX if ema else EMA_PREFIX
    allowed |= {k for k in keys if k.startswith(unused_unet)}
    allowed |= {
        k for k in keys if k.startswith(VAE_LOSS_PREFIX) or (vae_given and k.startswith(LDM_VAE_PREFIX))
    }
    if layout.openclip:
        allowed |= openclip_unused_keys(configs["text_encoder"], keys, layout.text_prefix)
    else:
        allowed |= clip_unused_keys(layout.text_prefix) & set(keys)
    if layout.text_2_prefix is not None:
        allowed |= xl_openclip_unused_keys(keys, layout.text_2_prefix)
    return frozenset(allowed)


def check_key_map(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    configs: Mapping[str, Mapping[str, Any]],
    layout: CheckpointLayout,
    ema: bool,
    vae_given: bool,
    config_source: str,
) -> None:
    """Map names and shapes only (meta tensors) and compare with the networks the configs build. In
    this order, each raising ModelFolderError naming the first few: a shape that differs, a model
    tensor nothing maps to, a checkpoint tensor left unused (outside :func:`allowed_unused`)."""
    rules = component_rules(configs, layout, ema)
    meta = MetaTensors(shapes)
    hint = "a different architecture? describe it with a diffusers folder (--config)"
    missing: list[str] = []
    used: set[str] = set()
    for component, mapping in rules.items():
        converted = apply_rules(meta, mapping)
        used |= converted.used
        origin = {name: rule.ldm for rule in mapping for name in rule.diffusers}
        model = meta_module(component, configs[component]).state_dict()
        for name, tensor in model.items():
            if name.endswith("position_ids"):
                continue
            if name not in converted.state_dict:
                missing.append(origin.get(name, name))
            elif converted.state_dict[name].shape != tensor.shape:
                raise ModelFolderError(
                    f"{path.name}: '{origin[name]}' is {list(shapes[origin[name]])} but the {config_source} "
                    f"{component} needs {list(tensor.shape)} for '{name}'; {hint}"
                )
    if missing:
        raise ModelFolderError(
            f"{path.name}: {len(missing)} tensors of the {config_source} architecture are missing: "
            f"{first_names(missing)}; {hint}"
        )
    allowed = allowed_unused(list(shapes), configs, layout, ema, vae_given)
    unused = [k for k in shapes if k not in used and k not in allowed]
    if unused:
        raise ModelFolderError(
            f"{path.name}: {len(unused)} tensors fit no network of the {config_source} architecture: "
            f"{first_names(unused)}"
        )


# --- prediction type --------------------------------------------------------------------------------


def read_checkpoint_yaml(path: Path) -> str | None:
    """The prediction type the LDM config beside a checkpoint states (A1111 reads ``<stem>.yaml``):
    ``model.params.parameterization`` "v" -> "v_prediction", "eps" or absent -> "epsilon" (LDM's
    default); None when there is no such file. One-line ModelFolderError for an unreadable file, one
    that is not an LDM config, or another parameterization."""
    config_path = path.with_suffix(".yaml")
    if not config_path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ModelFolderError(f"cannot read {config_path}: {one_line(error)}") from None
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise ModelFolderError(f"{config_path}: not an LDM model config (no model.params); fix or remove it")
    parameterization = params.get("parameterization", "eps")
    known = {"eps": "epsilon", "v": "v_prediction"}
    if parameterization not in known:
        raise ModelFolderError(
            f"{config_path}: parameterization {parameterization!r} is not supported (only 'eps' or 'v')"
        )
    return known[parameterization]


def probe_output_shift(unet: nn.Module) -> float:
    """mean(unet(x, 999, c) - x) for x = 0.5 everywhere (1, 4, 8, 8) and c = 0.5 (1, 2, context width):
    the probe A1111 and stable-diffusion.cpp run to tell an SD 2 v-prediction UNet from an epsilon one.

    At t = 999, alpha_bar = 0.0047, so a noisy latent is almost pure noise: an epsilon model returns
    about its input (shift near 0), a v model returns v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0,
    about -x0, far below its input. A shift under -1 (:data:`PROBE_THRESHOLD`) means v-prediction; an
    empirical rule that holds for the released SD 2 models, so the option and the yaml come first.
    """
    width = int(unet.config.cross_attention_dim)
    sample = torch.full((1, 4, 8, 8), PROBE_VALUE)
    context = torch.full((1, 2, width), PROBE_VALUE)
    with torch.no_grad():
        out = unet(sample, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=context).sample
    return float((out.float() - sample).mean())


@dataclass(frozen=True)
class _Prediction:
    kind: str
    source: str
    note: str


def _decide_prediction(
    path: Path,
    keys: frozenset[str],
    family: str,
    options: SourceOptions,
    folder_scheduler: Mapping[str, Any] | None,
) -> _Prediction | None:
    """Every rule but the probe, in order; None when only the probe can tell (SD 2, nothing stated)."""
    if options.prediction_type is not None:
        return _Prediction(options.prediction_type, "option", "given as an option")
    if V_PRED_MARKER in keys:
        return _Prediction(
            "v_prediction", f"marker {V_PRED_MARKER}", f"the file has the '{V_PRED_MARKER}' marker key"
        )
    from_yaml = read_checkpoint_yaml(path)
    if from_yaml is not None:
        return _Prediction(from_yaml, "yaml", f"from {path.with_suffix('.yaml').name}")
    if folder_scheduler is not None and folder_scheduler.get("prediction_type") in PREDICTION_TYPES:
        return _Prediction(
            str(folder_scheduler["prediction_type"]), "config_dir", "from the config folder's scheduler"
        )
    if family == "sd2":
        return None
    return _Prediction("epsilon", "default", f"{FAMILY_LABELS[family]} default")


# --- the two entry points ----------------------------------------------------------------------------


def inspect_checkpoint(path: str | Path, options: SourceOptions = _DEFAULT_OPTIONS) -> Checkpoint:
    """Validate a single-file checkpoint and decide how to load it (module docstring), from tensor names
    and shapes only, except for SD 2 files whose prediction type nothing states: those load the UNet
    once for :func:`probe_output_shift` (seconds; pass a prediction type to skip it). One-line
    ModelFolderError for anything that does not fit."""
    path = Path(path)
    if options.vae is not None and not options.vae.exists():
        raise ModelFolderError(f"VAE not found: {options.vae}")
    with open_tensors(path) as file:
        shapes = file.shapes
        keys = list(shapes)
        family = detect_family(path, shapes, options.ema)
        layout = _layout(path, keys, family, options)
        arch = _architecture(shapes, family, options)
        configs, config_source = arch.configs, arch.source
        check_key_map(path, shapes, configs, layout, options.ema, options.vae is not None, config_source)
        decided = _decide_prediction(path, frozenset(keys), family, options, arch.folder_scheduler)
        if decided is None:
            shift = probe_output_shift(_load_unet(file, configs["unet"], options.ema))
            kind = "v_prediction" if shift < PROBE_THRESHOLD else "epsilon"
            decided = _Prediction(kind, "probe", f"by the SD 2 probe (mean output shift {shift:.3f})")
    ztsnr = ZTSNR_MARKER in shapes
    if ztsnr and decided.kind != "v_prediction":
        raise ModelFolderError(
            f"{path.name}: the '{ZTSNR_MARKER}' marker asks for a zero-terminal-SNR schedule, which needs "
            f"v_prediction, but the prediction type is {decided.kind} ({decided.note})"
        )
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": decided.kind}
    if ztsnr:
        configs["scheduler"].update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if options.config_dir is None and family == "sd2" and decided.kind == "epsilon":
        configs["unet"]["sample_size"] = 64  # SD 2 epsilon models are the 512 px base; v the 768 px
        configs["vae"]["sample_size"] = 512
    notes = (*_notes(path, family, layout, options, decided, ztsnr, config_source), *arch.notes)
    return Checkpoint(
        path=path,
        family=family,
        prediction_type=decided.kind,
        prediction_source=decided.source,
        ema=options.ema,
        configs=configs,
        tokenizer_dir=arch.tokenizer_dir,
        vae_source=options.vae,
        notes=notes,
        layout=layout,
        tokenizer_2_dir=arch.tokenizer_2_dir,
    )


def _notes(
    path: Path,
    family: str,
    layout: CheckpointLayout,
    options: SourceOptions,
    decided: _Prediction,
    ztsnr: bool,
    config_source: str,
) -> tuple[str, ...]:
    if layout.text_2_prefix is not None:
        where = f"text encoders under '{layout.text_prefix}' and '{layout.text_2_prefix}'"
    else:
        where = f"text encoder under '{layout.text_prefix}'"
    notes = [
        f"{path.name}: {FAMILY_LABELS[family]} single-file checkpoint, {where}, "
        f"architecture from the {config_source}",
        f"prediction type {decided.kind} ({decided.note})",
        f"UNet from the {'EMA' if options.ema else 'non-EMA'} weights",
    ]
    if ztsnr:
        notes.append(f"zero-terminal-SNR schedule ('{ZTSNR_MARKER}' marker): trailing timesteps")
    if options.vae is not None:
        baked = "replaces the baked VAE" if layout.baked_vae else "(the file has no VAE)"
        notes.append(f"VAE from {options.vae} {baked}")
    return tuple(notes)


def _unet_rules(config: Mapping[str, Any], ema: bool) -> list[KeyRule]:
    rules = unet_rules(config)
    return [KeyRule(ema_key(rule.ldm), rule.diffusers, rule.transform) for rule in rules] if ema else rules


def _load_unet(file: TensorFile, config: Mapping[str, Any], ema: bool) -> nn.Module:
    return build_module(
        "unet", config, apply_rules(Float32Tensors(file), _unet_rules(config, ema)).state_dict
    )


def load_checkpoint(checkpoint: Checkpoint, only: Collection[str] | None = None) -> SourceModel:
    """The networks as float32 eval modules (:class:`engine.models.torch_modules.SourceModel`; SDXL's
    with ``text_encoder_2``).

    Each network is built on the meta device and its tensors assigned as read, one at a time and
    upcast to float32, so peak memory stays near one float32 copy of the model: measured on a 2.1 GB
    fp16 SD 1.5-sized .safetensors, 4.8 GB peak RSS for 4.3 GB of float32 weights. A ``.ckpt`` is
    memory-mapped, and its mapped pages (clean, reclaimable) add up to the file's size to the RSS.
    A VAE given as ``vae_source`` replaces the baked one. One-line ModelFolderError if the file
    changed since :func:`inspect_checkpoint` in a way the map no longer fits. ``only``: build just these
    components ("unet", "vae", "text_encoder", "text_encoder_2"), the others None (export loads one
    network at a time, so an SDXL export never holds the whole model).
    """
    configs = checkpoint.configs
    rules = component_rules(configs, checkpoint.layout, checkpoint.ema)
    components = ("text_encoder", "text_encoder_2", "unet", "vae")
    with open_tensors(checkpoint.path) as file:
        tensors = Float32Tensors(file)
        modules = {}
        wanted = (c for c in components if (c in rules or c == "vae") and (only is None or c in only))
        for component in wanted:
            if component == "vae" and checkpoint.vae_source is not None:
                modules[component] = load_vae(checkpoint.vae_source, configs["vae"])
            else:
                state_dict = apply_rules(tensors, rules[component]).state_dict
                modules[component] = build_module(component, configs[component], state_dict)
    return SourceModel(**{name: modules.get(name) for name in components})
