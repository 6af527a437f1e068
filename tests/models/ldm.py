"""Test-side writers of LDM-layout (A1111 / ComfyUI) checkpoints from diffusers state dicts.

Plain functions over the same key maps the engine reads with (inverted), so a checkpoint written
here and read back by diffusers' own ``from_single_file`` checks the maps independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.models.checkpoint.keymap import invert_rules
from engine.models.checkpoint.unet import LDM_UNET_PREFIX, unet_rules
from engine.models.checkpoint.vae import LDM_VAE_PREFIX, vae_rules


def unet_to_ldm(
    unet_state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX
) -> dict[str, torch.Tensor]:
    """LDM tensors (``model.diffusion_model.*``) of a diffusers UNet state dict."""
    return invert_rules(unet_state_dict, unet_rules(config, prefix))


def vae_to_ldm(
    vae_state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    attention: str = "ldm",
    prefix: str = LDM_VAE_PREFIX,
) -> dict[str, torch.Tensor]:
    """LDM tensors (``first_stage_model.*``; ``prefix=""`` for a bare VAE file) of a diffusers
    AutoencoderKL state dict; ``attention="diffusers"`` keeps the to_q / ... spelling, Linear-shaped."""
    return invert_rules(vae_state_dict, vae_rules(config, prefix, attention))


# --- text encoders and whole checkpoints (appended by H2b) -------------------------------------------

_TEXT_MODEL = "text_model."
# LDM DDPM buffers real checkpoints carry at the top level (values: SD's scaled-linear schedule).
_DDPM_BUFFER_NAMES = ("betas", "alphas_cumprod", "alphas_cumprod_prev")


def clip_to_ldm(
    text_state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    text_model_prefix: bool = True,
    position_ids: bool = True,
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """SD 1 tensors (``cond_stage_model.transformer.[text_model.]*``; ``prefix`` replaces
    ``cond_stage_model.transformer.``, e.g. SDXL's ``conditioner.embedders.0.transformer.``) of a
    CLIPTextModel state dict (with or without its own ``text_model.`` level); ``position_ids`` as
    transformers 4 saved it."""
    from engine.models.checkpoint.text import CLIP_PREFIX, clip_rules

    names = {k.removeprefix(_TEXT_MODEL): v for k, v in text_state_dict.items()}
    prefix = (prefix or CLIP_PREFIX) + (_TEXT_MODEL if text_model_prefix else "")
    out = invert_rules(names, clip_rules(config, prefix))
    if position_ids:
        out[f"{prefix}embeddings.position_ids"] = torch.arange(config["max_position_embeddings"])[None]
    return out


def openclip_to_ldm(
    text_state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], extras: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """SD 2 OpenCLIP tensors (``cond_stage_model.model.*``, fused in_proj) of a CLIPTextModel state dict;
    ``extras``: also what real files carry and never run, with random values: the block past the
    config's last (ViT-H's 24th), ``text_projection`` and ``logit_scale``."""
    from engine.models.checkpoint.text import OPENCLIP_PREFIX, openclip_rules

    names = {k.removeprefix(_TEXT_MODEL): v for k, v in text_state_dict.items()}
    out = invert_rules(names, openclip_rules(config, OPENCLIP_PREFIX))
    if extras:
        hidden, inner = config["hidden_size"], config["intermediate_size"]
        block = f"{OPENCLIP_PREFIX}transformer.resblocks.{config['num_hidden_layers']}."
        shapes = {
            "ln_1.weight": (hidden,),
            "ln_1.bias": (hidden,),
            "attn.in_proj_weight": (3 * hidden, hidden),
            "attn.in_proj_bias": (3 * hidden,),
            "attn.out_proj.weight": (hidden, hidden),
            "attn.out_proj.bias": (hidden,),
            "ln_2.weight": (hidden,),
            "ln_2.bias": (hidden,),
            "mlp.c_fc.weight": (inner, hidden),
            "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (hidden, inner),
            "mlp.c_proj.bias": (hidden,),
        }
        generator = torch.Generator().manual_seed(seed)
        out.update({block + name: torch.randn(shape, generator=generator) for name, shape in shapes.items()})
        out[f"{OPENCLIP_PREFIX}text_projection"] = torch.randn((hidden, hidden), generator=generator)
        out[f"{OPENCLIP_PREFIX}logit_scale"] = torch.tensor(4.6052)
    return out


def xl_openclip_to_ldm(
    text_state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """SDXL's second encoder in OpenCLIP layout (``conditioner.embedders.1.model.*``, or ``prefix``) from
    a CLIPTextModelWithProjection state dict: in_proj fused from q, k, v, ``text_projection`` stored
    (hidden, projection) as OpenCLIP multiplies ``x @ text_projection``, and ``logit_scale`` (ln 100,
    CLIP's trained temperature), which generative-models files carry and never run."""
    from engine.models.checkpoint.text import XL_OPENCLIP_PREFIX, xl_openclip_rules

    prefix = prefix or XL_OPENCLIP_PREFIX
    names = {k.removeprefix(_TEXT_MODEL): v for k, v in text_state_dict.items()}
    out = invert_rules(names, xl_openclip_rules(config, prefix))
    out[f"{prefix}logit_scale"] = torch.tensor(4.6052)
    return out


def _ddpm_buffers(scheduler: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    steps = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler.get("beta_start", 0.00085)), float(scheduler.get("beta_end", 0.012))
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return dict(zip(_DDPM_BUFFER_NAMES, (betas, alphas_cumprod, previous), strict=True))


def write_checkpoint(
    model_folder: Any,
    path: Any,
    dtype: torch.dtype = torch.float16,
    ema: bool = False,
    baked_vae: bool = True,
    markers: tuple[str, ...] = (),
    text_model_prefix: bool = True,
    vae_attention: str = "ldm",
    openclip: bool | None = None,
    openclip_extras: bool = True,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """Write a full LDM checkpoint from a diffusers model folder, as A1111 / ComfyUI files hold it; an
    SDXL folder (with text_encoder_2/) as generative-models' files hold it (:func:`xl_text_to_ldm`).

    ``path``: ``.safetensors``, or ``.ckpt`` (``torch.save({"state_dict": ...})``). Float tensors are
    stored as ``dtype``. ``ema``: also the EMA UNet (``model_ema.*``, names without dots) holding the
    folder's UNet weights times 2, so a test can tell which set was loaded, plus ``model_ema.decay`` /
    ``num_updates``. ``baked_vae``: include ``first_stage_model.*``. ``markers``: empty top-level tensors
    (``v_pred``, ``ztsnr``). ``openclip``: SD 2 text encoder layout (default: when the text encoder's
    activation is "gelu", OpenCLIP's; OpenAI CLIP uses quick_gelu). ``extra``: more tensors. The DDPM
    buffers ``betas`` / ``alphas_cumprod`` / ``alphas_cumprod_prev`` are written for SD 1 / 2 (SDXL
    files have none). Returns ``path``.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from engine.models.checkpoint.single_file import ema_key

    folder, path = Path(model_folder), Path(path)

    def config(name: str, file: str = "config.json") -> dict[str, Any]:
        return json.loads((folder / name / file).read_text())

    def weights(name: str, stem: str) -> dict[str, torch.Tensor]:
        return load_file(folder / name / f"{stem}.safetensors")

    text_config = config("text_encoder")
    text = weights("text_encoder", "model")
    xl = (folder / "text_encoder_2").is_dir()
    use_openclip = text_config.get("hidden_act") == "gelu" if openclip is None else openclip
    if xl:
        tensors = xl_text_to_ldm(folder, text_model_prefix)
    elif use_openclip:
        tensors = openclip_to_ldm(text, text_config, openclip_extras)
    else:
        tensors = clip_to_ldm(text, text_config, text_model_prefix)
    unet = unet_to_ldm(weights("unet", "diffusion_pytorch_model"), config("unet"))
    tensors.update(unet)
    if ema:
        tensors.update({ema_key(name): value * 2 for name, value in unet.items()})
        tensors.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    if baked_vae:
        tensors.update(vae_to_ldm(weights("vae", "diffusion_pytorch_model"), config("vae"), vae_attention))
    if not xl:
        tensors.update(_ddpm_buffers(config("scheduler", "scheduler_config.json")))
    tensors.update({marker: torch.tensor([]) for marker in markers})
    tensors.update(extra or {})
    stored = {
        name: (value.to(dtype) if value.is_floating_point() else value).contiguous()
        for name, value in tensors.items()
    }
    if path.suffix == ".safetensors":
        save_file(stored, path)
    else:
        torch.save({"state_dict": stored, "global_step": 1000}, path)
    return path


def xl_text_to_ldm(model_folder: Any, text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    """Both text encoders of an SDXL diffusers folder as ``sd_xl_base_1.0.safetensors`` holds them:
    CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.*`` (transformers names, with
    ``position_ids``), OpenCLIP bigG under ``conditioner.embedders.1.model.*`` (see
    :func:`xl_openclip_to_ldm`)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from engine.models.checkpoint.text import XL_CLIP_PREFIX

    folder = Path(model_folder)
    configs = {name: json.loads((folder / name / "config.json").read_text()) for name in _XL_ENCODERS}
    weights = {name: load_file(folder / name / "model.safetensors") for name in _XL_ENCODERS}
    first = clip_to_ldm(
        weights["text_encoder"], configs["text_encoder"], text_model_prefix, prefix=XL_CLIP_PREFIX
    )
    return {**first, **xl_openclip_to_ldm(weights["text_encoder_2"], configs["text_encoder_2"])}


_XL_ENCODERS = ("text_encoder", "text_encoder_2")
