"""Thin torch wrapper modules whose ``forward`` takes exactly one engine graph's inputs.

Export traces them to ONNX and the torch backend runs them, so both speak the interface of
:mod:`engine.specs`. Imports torch: never imported by the ONNX Runtime path.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from engine.errors import ModelFolderError
from engine.manifest import Manifest
from engine.models.checkpoint.tensors import one_line
from engine.models.folder import ModelFolder, tensor_shapes
from engine.specs import Network, lora_target_name

T = TypeVar("T")


class TextEncoderWrapper(nn.Module):
    """CLIP text encoder: token ids to the last hidden state and every layer's output after the final
    layer norm, stacked (B, num_layers, S, H): A1111's clip skip n takes layer num_layers - n."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        # transformers 5 dropped the .text_model level that transformers 4 had.
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        normed = torch.stack([final_layer_norm(h) for h in out.hidden_states[1:]], dim=1)
        return out.last_hidden_state, normed


class UNetWrapper(nn.Module):
    """UNet2DConditionModel forward for SD 1.x / 2.x that always takes upsample sizes from the skips.

    diffusers only forwards the skip-connection sizes when a latent side is not a multiple of
    2**num_upsamplers, a Python branch that tracing would freeze. Passing them always gives the
    same numbers for every size and lets one graph serve any latent size (any multiple of 8 px).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.denoise(sample, self.time_embedding(sample, timestep), encoder_hidden_states)

    def time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        return unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)

    def denoise(
        self, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's blocks given its (B, E) embedding of timestep and added conditioning."""
        unet = self.unet
        hidden = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for block in unet.down_blocks:
            kwargs = _cross_attention_kwargs(block, encoder_hidden_states)
            hidden, res = block(hidden_states=hidden, temb=emb, **kwargs)
            skips += res
        hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        for index, block in enumerate(unet.up_blocks):
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if index < len(unet.up_blocks) - 1 else None
            kwargs = _cross_attention_kwargs(block, encoder_hidden_states)
            hidden = block(
                hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **kwargs
            )
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class XlUNetWrapper(UNetWrapper):
    """SDXL's UNet: diffusers' "text_time" added conditioning, ``text_embeds`` (B, P) and ``time_ids``
    (B, 6), added to the timestep embedding as UNet2DConditionModel.forward adds them."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        emb = self.time_embedding(sample, timestep)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        emb = emb + self.unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        return self.denoise(sample, emb, encoder_hidden_states)


class XlTextEncoderWrapper(nn.Module):
    """An SDXL text encoder: every layer's output without the final layer norm, stacked (B, L, S, H)
    (the conditioning is the penultimate one, diffusers' ``hidden_states[-2]``); with ``projected``
    (text_encoder_2, a CLIPTextModelWithProjection) also its pooled, projected ``text_embeds`` (B, P).
    The module is registered under ``component``, the name LoRA targets use."""

    def __init__(self, text_encoder: nn.Module, component: str, projected: bool) -> None:
        super().__init__()
        self.component = component
        self.projected = projected
        self.add_module(component, text_encoder)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = getattr(self, self.component)(input_ids, output_hidden_states=True)
        stacked = torch.stack(out.hidden_states[1:], dim=1)
        return (stacked, out.text_embeds) if self.projected else stacked


def _cross_attention_kwargs(block: nn.Module, encoder_hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
    if getattr(block, "has_cross_attention", False):
        return {"encoder_hidden_states": encoder_hidden_states}
    return {}


class VaeDecoderWrapper(nn.Module):
    """VAE decoder: latents (already divided by the scaling factor) to pixels in about [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


class VaeEncoderWrapper(nn.Module):
    """VAE encoder: pixels in [-1, 1] to the posterior's mean and standard deviation (unscaled)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean, posterior.std


class GuidedUNet(nn.Module):
    """Classifier-free guidance around a UNet module, as diffusers combines the two halves.

    Takes B latents and timesteps, 2B embeddings ([negatives; positives]) and a (1,) scale; runs the
    UNet once on the doubled batch and returns uncond + scale * (text - uncond) in float32.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor
    ) -> torch.Tensor:
        """conditioning: encoder_hidden_states (2B, S, D) (SDXL: then text_embeds and time_ids, 2B rows
        each), then guidance_scale (1,)."""
        *rows, guidance_scale = conditioning
        noise = self.unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]), *rows)
        uncond, text = noise.float().chunk(2)
        return uncond + guidance_scale.float() * (text - uncond)


def wrap(
    network: Network,
    text_encoder: nn.Module | None,
    unet: nn.Module | None,
    vae: nn.Module | None,
    text_encoder_2: nn.Module | None = None,
    xl: bool | None = None,
) -> nn.Module:
    """The wrapper module for one network, in eval mode; SDXL's wrappers when ``xl`` (None: when
    ``text_encoder_2`` is given). Only the module the network runs needs to be given."""
    if text_encoder_2 is not None if xl is None else xl:
        xl = {
            Network.TEXT_ENCODER: lambda: XlTextEncoderWrapper(text_encoder, "text_encoder", projected=False),
            Network.TEXT_ENCODER_2: lambda: XlTextEncoderWrapper(
                text_encoder_2, "text_encoder_2", projected=True
            ),
            Network.UNET: lambda: XlUNetWrapper(unet),
            Network.UNET_CFG: lambda: GuidedUNet(XlUNetWrapper(unet)),
        }
        if network in xl:
            return xl[network]().eval()
    wrappers = {
        Network.TEXT_ENCODER: lambda: TextEncoderWrapper(text_encoder),
        Network.UNET: lambda: UNetWrapper(unet),
        Network.UNET_CFG: lambda: GuidedUNet(UNetWrapper(unet)),
        Network.VAE_DECODER: lambda: VaeDecoderWrapper(vae),
        Network.VAE_ENCODER: lambda: VaeEncoderWrapper(vae),
    }
    if network not in wrappers:
        raise ModelFolderError(f"the model has no {network.value} (it is not an SDXL model)")
    return wrappers[network]().eval()


@dataclass(frozen=True)
class SourceModel:
    """The torch networks of a diffusers folder, in float32 eval mode (``text_encoder_2``: SDXL's
    CLIPTextModelWithProjection, None for SD 1.x / 2.x)."""

    text_encoder: nn.Module | None
    unet: nn.Module | None
    vae: nn.Module | None
    text_encoder_2: nn.Module | None = None
    xl: bool | None = None  # None: whether text_encoder_2 is given (a partial load says it)

    def wrapper(self, network: Network) -> nn.Module:
        return wrap(network, self.text_encoder, self.unet, self.vae, self.text_encoder_2, self.xl)


def lora_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules of a wrapper (or of a SourceModel's component wrapped as one), by
    LoRA target name (see :func:`engine.specs.lora_target_name`)."""
    found = {}
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            target = lora_target_name(f"{name}.weight")
            if target is not None:
                found[target] = child
    return found


def _component_classes() -> dict[str, type]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }


def meta_module(component: str, config: Mapping[str, Any]) -> nn.Module:
    """The network ("unet", "vae", "text_encoder", "text_encoder_2") that ``config`` (a diffusers config
    dict, or a CLIPTextConfig dict for a text encoder) describes, built on the meta device: shapes and
    ``.config`` without memory, well under a second. One-line ModelFolderError
    "<component> config is not valid: ..." when diffusers / transformers reject the config."""
    cls = _component_classes()[component]
    try:
        with torch.device("meta"):
            if component.startswith("text_encoder"):
                from transformers import CLIPTextConfig

                return cls(CLIPTextConfig(**config))
            return cls.from_config(dict(config))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ModelFolderError(f"{component} config is not valid: {one_line(error)}") from None


TEXT_MODEL_PREFIX = "text_model."


def canonical_text_encoder_keys(tensors: Mapping[str, T], source: str) -> dict[str, T]:
    """The same entries keyed without the ``text_model.`` prefix, whichever way they were saved.

    transformers 4's CLIPTextModel nests its modules under ``text_model`` and saves that prefix;
    transformers 5's has no such level and saves without it. transformers 5's from_pretrained loads
    both (its CLIPTextModel conversion mapping drops the prefix: PrefixChange in
    conversion_mapping.py), so names are compared in this form. ``source`` names the file or module
    in the ModelFolderError raised when one name is stored both with and without the prefix.
    """
    result: dict[str, T] = {}
    for name, value in tensors.items():
        key = name.removeprefix(TEXT_MODEL_PREFIX)
        if key in result:
            raise ModelFolderError(
                f"text_encoder: {source} holds '{key}' both with and without the '{TEXT_MODEL_PREFIX}' prefix"
            )
        result[key] = value
    return result


def check_weight_shapes(folder: ModelFolder, component: str) -> None:
    """Compare the config's parameter shapes with the safetensors header; raise on the first mismatch.

    Text-encoder names are compared without the ``text_model.`` prefix (see
    :func:`canonical_text_encoder_keys`), so transformers 4 and transformers 5 files both pass.
    """
    weights = folder.weights[component]
    if not weights.safetensors:
        return
    model = meta_module(component, folder.configs[component])
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = tensor_shapes(weights.path)
    if component.startswith("text_encoder"):
        expected = canonical_text_encoder_keys(expected, type(model).__name__)
        found = canonical_text_encoder_keys(found, weights.path.name)
    for name, shape in expected.items():
        if name in found and found[name] != shape:
            raise ModelFolderError(
                f"{component}: config/weights mismatch for '{name}': config gives {list(shape)}, "
                f"{weights.path.name} holds {list(found[name])}"
            )
    missing = [name for name in expected if name not in found and not name.endswith("position_ids")]
    if missing:
        raise ModelFolderError(
            f"{component}: {weights.path.name} lacks {len(missing)} weights of its config, "
            f"e.g. '{missing[0]}'"
        )


def load_component(folder: ModelFolder, component: str) -> nn.Module:
    cls = _component_classes()[component]
    weights = folder.weights[component]
    try:
        model = cls.from_pretrained(
            folder.root,
            subfolder=component,
            variant=weights.variant,
            use_safetensors=weights.safetensors,
            torch_dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFolderError(f"{component}: cannot load {weights.path}: {first}") from None
    return model.eval().requires_grad_(False)


def check_folder_weights(folder: ModelFolder, vae: Path | None = None) -> None:
    """Every network's safetensors header against its config (meta-device models, no weights read);
    the folder's VAE is skipped when ``vae`` replaces it. ModelFolderError on the first mismatch."""
    for component in folder.weights:
        if component != "vae" or vae is None:
            check_weight_shapes(folder, component)


def load_source_model(
    folder: ModelFolder, vae: Path | None = None, only: Collection[str] | None = None
) -> SourceModel:
    """Load the networks in float32 (fp16 variant files are upcast), shapes checked first; ``vae``: a
    diffusers AutoencoderKL folder or single-file VAE to use instead of the folder's; ``only``: just these
    components ("unet", "vae", "text_encoder", "text_encoder_2"), the others None."""
    check_folder_weights(folder, vae)

    def load(component: str) -> nn.Module | None:
        if component not in folder.weights or (only is not None and component not in only):
            return None
        if component == "vae" and vae is not None:
            return load_vae(vae, folder.configs["vae"])
        return load_component(folder, component)

    return SourceModel(
        text_encoder=load("text_encoder"),
        unet=load("unet"),
        vae=load("vae"),
        text_encoder_2=load("text_encoder_2"),
        xl="text_encoder_2" in folder.weights,
    )


def load_vae(path: Path, config: Mapping[str, Any]) -> nn.Module:
    """An AutoencoderKL (float32, eval) from a VAE folder or file (see checkpoint.vae.read_vae)."""
    from engine.models.checkpoint.vae import read_vae

    weights = read_vae(path, config=config)
    return build_module("vae", weights.config, weights.state_dict)


def build_module(
    component: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A diffusers/transformers network ("unet", "vae", "text_encoder") from its config and a state
    dict in its own names: built on the meta device, then each tensor assigned as float32, so peak
    memory stays near one float32 copy of the network. Missing or unexpected keys raise
    ModelFolderError listing the first few; so does an invalid config (:func:`meta_module`)."""
    model = meta_module(component, config)
    tensors = {name: value.to(torch.float32) for name, value in state_dict.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [name for name in result.missing_keys if not name.endswith("position_ids")]
    for kind, names in (("lacks", missing), ("has unexpected", result.unexpected_keys)):
        if names:
            raise ModelFolderError(f"{component}: the weights {kind} {len(names)} tensors, e.g. {names[:3]}")
    return _materialize(model).eval().requires_grad_(False)


def _materialize(model: nn.Module) -> nn.Module:
    """Non-persistent buffers (not in state dicts, so still on the meta device) made real: CLIP's
    ``position_ids`` (0..max_positions-1); any other one is a bug here, raised as such."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"{type(module).__name__}.{name}: no value for a non-persistent buffer")
            positions = torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape)
            module.register_buffer(name, positions.clone(), persistent=False)
    return model


def load_source_from_manifest(manifest: Manifest) -> SourceModel:
    """The model an engine was exported from (a diffusers folder or a single-file checkpoint, with the
    same options), loaded as export loaded it; what the torch backends run. One-line
    EngineFolderError when the manifest names no model or it is gone, ModelFolderError when it no
    longer loads."""
    from engine.models.source import source_from_manifest

    return source_from_manifest(manifest).load()
