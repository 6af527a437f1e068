"""Thin torch wrapper modules whose ``forward`` takes exactly one engine graph's inputs.

Export traces them to ONNX and the torch backend runs them, so both speak the interface of
:mod:`engine.specs`. Imports torch: never imported by the ONNX Runtime path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import EngineFolderError, ModelFolderError
from engine.manifest import Manifest
from engine.models.folder import ModelFolder, inspect_model_folder, tensor_shapes
from engine.specs import Network


class TextEncoderWrapper(nn.Module):
    """CLIP text encoder: token ids to the last and the (normed) penultimate hidden states."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        # transformers 5 dropped the .text_model level that transformers 4 had.
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        penultimate = final_layer_norm(out.hidden_states[-2])
        return out.last_hidden_state, penultimate


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
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
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
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor,
    ) -> torch.Tensor:
        noise = self.unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states)
        uncond, text = noise.float().chunk(2)
        return uncond + guidance_scale.float() * (text - uncond)


def wrap(network: Network, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> nn.Module:
    """The wrapper module for one network, in eval mode."""
    wrappers = {
        Network.TEXT_ENCODER: lambda: TextEncoderWrapper(text_encoder),
        Network.UNET: lambda: UNetWrapper(unet),
        Network.UNET_CFG: lambda: GuidedUNet(UNetWrapper(unet)),
        Network.VAE_DECODER: lambda: VaeDecoderWrapper(vae),
        Network.VAE_ENCODER: lambda: VaeEncoderWrapper(vae),
    }
    return wrappers[network]().eval()


@dataclass(frozen=True)
class SourceModel:
    """The torch networks of a diffusers folder, in float32 eval mode."""

    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module

    def wrapper(self, network: Network) -> nn.Module:
        return wrap(network, self.text_encoder, self.unet, self.vae)


def _component_classes() -> dict[str, type]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def check_weight_shapes(folder: ModelFolder, component: str, cls: type) -> None:
    """Compare the config's parameter shapes with the safetensors header; raise on the first mismatch."""
    weights = folder.weights[component]
    if not weights.safetensors:
        return
    with torch.device("meta"):
        if component == "text_encoder":
            from transformers import CLIPTextConfig

            model = cls(CLIPTextConfig(**folder.configs[component]))
        else:
            model = cls.from_config(folder.configs[component])
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = tensor_shapes(weights.path)
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


def load_source_model(folder: ModelFolder) -> SourceModel:
    """Load the three networks in float32 (fp16 variant files are upcast), shapes checked first."""
    for component, cls in _component_classes().items():
        check_weight_shapes(folder, component, cls)
    return SourceModel(
        text_encoder=load_component(folder, "text_encoder"),
        unet=load_component(folder, "unet"),
        vae=load_component(folder, "vae"),
    )


def load_source_from_manifest(manifest: Manifest) -> SourceModel:
    """The diffusers folder an engine was exported from (``manifest.source["model_dir"]``), loaded as
    :func:`load_source_model` does; what the torch backends run. One-line EngineFolderError when the
    manifest names no folder or the folder is gone, ModelFolderError when it no longer loads."""
    model_dir = manifest.source.get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        raise EngineFolderError(
            f"the torch backends need the source model folder {model_dir!r} named in the manifest: not found"
        )
    return load_source_model(inspect_model_folder(model_dir))
