"""One table of tensor specs per network.

The same table drives the ONNX input/output names and dynamic axes at export, the runtime's input
checks, buffer allocation, sample inputs for parity gates and TensorRT optimization profiles.
A dim is either a fixed int or the name of a symbolic axis; a symbol shared by several tensors
must take the same value in all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Precision(str, Enum):
    """Numeric precision of a graph's weights and arithmetic: of an exported graph, a TensorRT plan, or
    what a backend runs in. For the SD VAE, FP16 means fp16 guarded by an fp32 rerun on overflow (it
    overflows in fp16); bf16 keeps fp32's exponent range and needs no guard."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Network(str, Enum):
    """The graphs an engine folder holds."""

    TEXT_ENCODER = "text_encoder"
    # SDXL's second text encoder (OpenCLIP bigG with its projection); absent from SD 1.x / 2.x folders.
    TEXT_ENCODER_2 = "text_encoder_2"
    UNET = "unet"
    # The UNet with classifier-free guidance inside: derived from the unet graph, sharing its weights.
    UNET_CFG = "unet_cfg"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"


# Symbolic axes. Latent sizes are image sizes divided by the VAE scale factor.
BATCH = "batch"
CONTEXT_BATCH = "context_batch"  # fused guidance: the embeddings' batch, twice the latents'
SEQUENCE = "sequence"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"
IMAGE_HEIGHT = "image_height"
IMAGE_WIDTH = "image_width"

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, dims (ints or symbolic axis names) and numpy dtype name of one graph input or output."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str

    def symbols(self) -> tuple[str, ...]:
        return tuple(d for d in self.dims if isinstance(d, str))

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape with every symbolic axis replaced by its size."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def to_json(self) -> dict:
        return {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}

    @staticmethod
    def from_json(data: Mapping) -> TensorSpec:
        return TensorSpec(str(data["name"]), tuple(data["dims"]), str(data["dtype"]))


@dataclass(frozen=True)
class GraphSpec:
    """The interface of one compiled network."""

    network: Network
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def symbols(self) -> tuple[str, ...]:
        """Every symbolic axis, in order of first appearance."""
        seen: dict[str, None] = {}
        for tensor in self.inputs + self.outputs:
            seen.update(dict.fromkeys(tensor.symbols()))
        return tuple(seen)

    def to_json(self) -> dict:
        return {
            "network": self.network.value,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @staticmethod
    def from_json(data: Mapping) -> GraphSpec:
        return GraphSpec(
            Network(data["network"]),
            tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            tuple(TensorSpec.from_json(t) for t in data["outputs"]),
        )


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Stable Diffusion model that fix the non-symbolic dims of its graphs."""

    latent_channels: int = 4
    text_hidden_size: int = 768
    text_max_length: int = 77
    vae_scale_factor: int = 8
    text_num_layers: int = 12  # CLIP ViT-L: 12; SD 2's OpenCLIP ViT-H as diffusers keeps it: 23
    # SDXL (all 0 for SD 1.x / 2.x): the second text encoder's width and layers (bigG: 1280, 32), its
    # projected pooled output (projection_dim: 1280) and the UNet's time ids (original size, crop
    # top-left, target size: 6), the two inputs of diffusers' "text_time" added conditioning.
    text_hidden_size_2: int = 0
    text_num_layers_2: int = 0
    pooled_size: int = 0
    time_ids_size: int = 0

    @property
    def is_xl(self) -> bool:
        """Whether the model is SDXL-shaped: two text encoders and text_time added conditioning."""
        return self.text_hidden_size_2 > 0

    @property
    def context_size(self) -> int:
        """The UNet's cross-attention width: the text encoders' widths added (SDXL: 768 + 1280 = 2048)."""
        return self.text_hidden_size + self.text_hidden_size_2

    @property
    def networks(self) -> tuple[Network, ...]:
        """The graphs a full export of this model holds."""
        return tuple(n for n in Network if self.is_xl or n is not Network.TEXT_ENCODER_2)


def text_encoder_spec(dims: ModelDims) -> GraphSpec:
    if dims.is_xl:
        return xl_text_encoder_spec(Network.TEXT_ENCODER, dims.text_hidden_size, dims.text_num_layers, dims)
    hidden = (BATCH, dims.text_max_length, dims.text_hidden_size)
    return GraphSpec(
        Network.TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", (BATCH, dims.text_max_length), "int64"),),
        outputs=(
            TensorSpec("last_hidden_state", hidden, "float32"),
            # Every layer's output after the final layer norm, first layer first: A1111's "clip skip
            # n" is [:, num_layers - n] (n = 1 is last_hidden_state).
            TensorSpec("normed_hidden_states", (BATCH, dims.text_num_layers, *hidden[1:]), "float32"),
        ),
    )


def xl_text_encoder_spec(network: Network, hidden_size: int, num_layers: int, dims: ModelDims) -> GraphSpec:
    """An SDXL text encoder: every layer's output *without* the final layer norm, stacked (B, L, S, H)
    (SDXL conditions on the penultimate one, [:, -2]; A1111's clip skip n takes [:, -(n + 1)]); the
    second encoder also gives ``text_embeds`` (B, P), its projected pooled output (at the first EOS)."""
    outputs = [TensorSpec("hidden_states", (BATCH, num_layers, dims.text_max_length, hidden_size), "float32")]
    if network is Network.TEXT_ENCODER_2:
        outputs.append(TensorSpec("text_embeds", (BATCH, dims.pooled_size), "float32"))
    return GraphSpec(
        network,
        inputs=(TensorSpec("input_ids", (BATCH, dims.text_max_length), "int64"),),
        outputs=tuple(outputs),
    )


def text_encoder_2_spec(dims: ModelDims) -> GraphSpec:
    return xl_text_encoder_spec(Network.TEXT_ENCODER_2, dims.text_hidden_size_2, dims.text_num_layers_2, dims)


# The inputs besides sample and timestep that hold one row per conditioning (the embeddings' batch).
CONDITIONING_INPUTS = ("encoder_hidden_states", "text_embeds", "time_ids")


def unet_spec(dims: ModelDims) -> GraphSpec:
    """sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, S, D); SDXL adds text_embeds (B, P)
    and time_ids (B, 6) -> noise_pred (B, C, h, w)."""
    latent = (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    inputs = [
        TensorSpec("sample", latent, "float32"),
        TensorSpec("timestep", (BATCH,), "float32"),
        TensorSpec("encoder_hidden_states", (BATCH, SEQUENCE, dims.context_size), "float32"),
    ]
    if dims.is_xl:
        inputs.append(TensorSpec("text_embeds", (BATCH, dims.pooled_size), "float32"))
        inputs.append(TensorSpec("time_ids", (BATCH, dims.time_ids_size), "float32"))
    return GraphSpec(
        Network.UNET, inputs=tuple(inputs), outputs=(TensorSpec("noise_pred", latent, "float32"),)
    )


def unet_cfg_spec(dims: ModelDims) -> GraphSpec:
    """B latents, B timesteps, 2B embeddings ([negatives; positives]; SDXL: 2B text_embeds and time_ids
    too) and the scale -> B guided noises."""
    plain = unet_spec(dims)
    sample, timestep = plain.inputs[:2]
    conditioning = tuple(TensorSpec(t.name, (CONTEXT_BATCH, *t.dims[1:]), t.dtype) for t in plain.inputs[2:])
    return GraphSpec(
        Network.UNET_CFG,
        inputs=(sample, timestep, *conditioning, TensorSpec("guidance_scale", (1,), "float32")),
        outputs=(TensorSpec("guided_noise", sample.dims, "float32"),),
    )


def vae_decoder_spec(dims: ModelDims) -> GraphSpec:
    return GraphSpec(
        Network.VAE_DECODER,
        inputs=(TensorSpec("latent", (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH), "float32"),),
        outputs=(TensorSpec("image", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH), "float32"),),
    )


def vae_encoder_spec(dims: ModelDims) -> GraphSpec:
    latent = (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    return GraphSpec(
        Network.VAE_ENCODER,
        inputs=(TensorSpec("image", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH), "float32"),),
        outputs=(TensorSpec("latent_mean", latent, "float32"), TensorSpec("latent_std", latent, "float32")),
    )


SPEC_BUILDERS = {
    Network.TEXT_ENCODER: text_encoder_spec,
    Network.TEXT_ENCODER_2: text_encoder_2_spec,
    Network.UNET: unet_spec,
    Network.UNET_CFG: unet_cfg_spec,
    Network.VAE_DECODER: vae_decoder_spec,
    Network.VAE_ENCODER: vae_encoder_spec,
}


def graph_specs(dims: ModelDims) -> dict[Network, GraphSpec]:
    """The spec of every network the model has (SD 1.x / 2.x: no text_encoder_2)."""
    return {network: SPEC_BUILDERS[network](dims) for network in dims.networks}


def axis_sizes(
    batch: int, latent_height: int, latent_width: int, vae_scale_factor: int, sequence: int = 77
) -> dict[str, int]:
    """Sizes of every symbolic axis for one request shape."""
    return {
        BATCH: batch,
        CONTEXT_BATCH: 2 * batch,
        SEQUENCE: sequence,
        LATENT_HEIGHT: latent_height,
        LATENT_WIDTH: latent_width,
        IMAGE_HEIGHT: latent_height * vae_scale_factor,
        IMAGE_WIDTH: latent_width * vae_scale_factor,
    }


def sample_inputs(
    spec: GraphSpec, sizes: Mapping[str, int], rng: np.random.Generator, vocab_size: int = 1000
) -> dict[str, np.ndarray]:
    """Random inputs that fit the spec: normal floats, token ids below vocab_size, timesteps in
    [0, 1000), guidance scales in [1, 12), SDXL time ids as whole pixels in [0, 1024]."""
    feeds: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.shape(sizes)
        if tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            feeds[tensor.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        elif tensor.name == "guidance_scale":
            feeds[tensor.name] = rng.uniform(1, 12, size=shape).astype(np.float32)
        elif tensor.name == "time_ids":  # sizes and crop offsets in pixels
            feeds[tensor.name] = rng.integers(0, 1025, size=shape).astype(np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def check_inputs(spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Validate names, dtypes and shapes against the spec; return the symbolic axis sizes.

    Raises TypeError (wrong name or dtype) or ValueError (wrong shape) naming the input.
    """
    expected = set(spec.input_names)
    unknown = sorted(set(feeds) - expected)
    missing = [name for name in spec.input_names if name not in feeds]
    if unknown or missing:
        raise TypeError(
            f"{spec.network.value}: unexpected inputs {unknown} / missing inputs {missing}; "
            f"expects {spec.input_names}"
        )
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        _check_tensor(spec.network, tensor, feeds[tensor.name], sizes)
    if CONTEXT_BATCH in sizes and sizes[CONTEXT_BATCH] != 2 * sizes[BATCH]:
        raise ValueError(
            f"{spec.network.value}: guidance needs 2 x {sizes[BATCH]} embeddings (negatives then "
            f"positives), got {sizes[CONTEXT_BATCH]}"
        )
    return sizes


def _check_tensor(network: Network, tensor: TensorSpec, value: np.ndarray, sizes: dict[str, int]) -> None:
    where = f"{network.value} input '{tensor.name}'"
    dtype = getattr(value, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.dtype(tensor.dtype):
        raise TypeError(f"{where} must be {tensor.dtype}, got {dtype if dtype is not None else type(value)}")
    if len(value.shape) != len(tensor.dims):
        raise ValueError(f"{where} must have shape {list(tensor.dims)}, got {list(value.shape)}")
    for axis, (dim, size) in enumerate(zip(tensor.dims, value.shape, strict=True)):
        if isinstance(dim, int) and size != dim:
            raise ValueError(f"{where} axis {axis} must be {dim}, got {size} (shape {list(value.shape)})")
        if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
            raise ValueError(
                f"{where} axis {axis} ({dim}) is {size} but another input has {dim}={sizes[dim]}"
            )


# Components a LoRA can target, as the wrapper modules name their submodule.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def lora_target_name(parameter: str) -> str | None:
    """``component:module`` of a wrapper parameter name ("unet.down_blocks.0...to_q.weight" ->
    "unet:down_blocks.0...to_q"): how the manifest and LoRA matching name a patchable weight. None for
    a parameter outside a LoRA-able component or not a ``weight``. Wrapper prefixes (the fp16 boundary's
    ``inner.``, the guidance wrapper's nested ``unet.unet.``) and transformers 4's ``text_model.`` level
    are dropped."""
    parts = parameter.split(".")
    found = [index for index, part in enumerate(parts[:-1]) if part in LORA_COMPONENTS]
    if parts[-1] != "weight" or not found:
        return None
    last = found[-1]
    module = [p for p in parts[last + 1 : -1] if p != "text_model"]
    return f"{parts[last]}:{'.'.join(module)}"
