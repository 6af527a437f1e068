"""Random-weight Stable Diffusion model folders, for tests and benchmarks without a model hub.

``init_random(preset, out_dir, seed)`` writes a diffusers-format folder (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/, safetensors weights) that
``StableDiffusionPipeline.from_pretrained`` loads. ``sd15`` and ``sd21`` mirror the real SD 1.5 /
SD 2.1 configs in every field that shapes the graphs; ``tiny`` (SD 1 style) and ``tiny-v``
(SD 2 style: v-prediction, linear projection, upcast attention, "!" padding) keep SD's
structure (4-level UNet and VAE, cross-attention, CLIP tokenizer) at a size that builds in about a
second. ``sdxl`` mirrors SDXL base 1.0 and ``tiny-xl`` is its small copy: their folders add
text_encoder_2/ (projected, OpenCLIP-bigG style) and tokenizer_2/ ("!" padding) and load with
``StableDiffusionXLPipeline.from_pretrained``. The tokenizer is a synthetic but valid CLIP
byte-level BPE generated here, so the package needs no data files; real model folders bring their
own vocabulary.

Weights are PyTorch's default initialization, seeded per component, so the same seed gives
byte-identical safetensors. That initialization already keeps activations small, so nothing is
rescaled: measured over 50 Euler steps with CFG 7.5 at a 32x32 latent, the guided UNet output
stays below 2.8 (sd15) / 2.2 (sd21) and the largest activation inside the UNet below 41 / 7,
well inside fp16's range; the tests check the tiny presets over 50 steps and sd15/sd21 over 3.
tiny-xl through diffusers' SDXL pipeline (50 Euler steps, CFG 7.5, 8x8 latent): UNet output below
1.1; the sdxl preset is not measured yet.

Export-side only: imports torch, diffusers and transformers; the runtime never imports it.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engine.fsutil import staged_folder, write_atomic
from engine.text.tokenizer import bytes_to_unicode

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 77

# English letters, most frequent first: the order synthetic merges are ranked by.
_LETTERS = "etaoinsrhldcumfpgwybvkxjqz"
# How many tokens of one merge level are extended at the next: bounds the work per level.
_PREFIXES_PER_LEVEL = 4096


class Preset(str, Enum):
    TINY = "tiny"
    TINY_V = "tiny-v"
    TINY_XL = "tiny-xl"
    SD15 = "sd15"
    SD21 = "sd21"
    SDXL = "sdxl"


class UNetLayout(str, Enum):
    """Which UNet levels (highest resolution first) have cross-attention blocks."""

    SD = "sd"  # every level but the lowest-resolution one (SD 1.x / 2.x)
    SDXL = "sdxl"  # every level but the highest-resolution one (SDXL)


@dataclass(frozen=True)
class TextTimeSpec:
    """SDXL's added conditioning (``addition_embed_type`` "text_time"): the pooled, projected output of
    text_encoder_2 joined with six numbers (original height, width; crop top, left; target height,
    width), each embedded as ``time_embed_dim`` sinusoids."""

    time_embed_dim: int  # diffusers' addition_time_embed_dim
    pooled_dim: int  # text_encoder_2's projection_dim

    @property
    def input_dim(self) -> int:
        """projection_class_embeddings_input_dim, as StableDiffusionXLPipeline._get_add_time_ids checks it."""
        return 6 * self.time_embed_dim + self.pooled_dim


@dataclass(frozen=True)
class UNetSpec:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int | tuple[int, ...]
    cross_attention_dim: int
    norm_num_groups: int
    sample_size: int
    use_linear_projection: bool = False
    upcast_attention: bool = False
    layout: UNetLayout = UNetLayout.SD
    transformer_layers_per_block: int | tuple[int, ...] = 1
    text_time: TextTimeSpec | None = None

    def block_types(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(down_block_types, up_block_types) for ``layout``; up blocks mirror down blocks."""
        levels = len(self.block_out_channels)
        if self.layout is UNetLayout.SD:
            attention = (True,) * (levels - 1) + (False,)
        else:
            attention = (False,) + (True,) * (levels - 1)
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        return down, up

    def config(self) -> dict[str, Any]:
        """The diffusers UNet2DConditionModel config; SD presets give exactly SD 1/2's keys, SDXL ones
        add transformer_layers_per_block and the text_time conditioning as SDXL base 1.0 has them."""
        down, up = self.block_types()
        head_dim = self.attention_head_dim
        config = {
            "sample_size": self.sample_size,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(head_dim) if isinstance(head_dim, tuple) else head_dim,
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "center_input_sample": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
        }
        if self.transformer_layers_per_block != 1:
            layers = self.transformer_layers_per_block
            config["transformer_layers_per_block"] = list(layers) if isinstance(layers, tuple) else layers
        if self.text_time is not None:
            config["addition_embed_type"] = "text_time"
            config["addition_time_embed_dim"] = self.text_time.time_embed_dim
            config["projection_class_embeddings_input_dim"] = self.text_time.input_dim
        return config


@dataclass(frozen=True)
class VaeSpec:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    sample_size: int
    scaling_factor: float = 0.18215  # SDXL's VAE: 0.13025
    force_upcast: bool | None = None  # None: unstated, as in SD 1/2's config (diffusers' default, True)

    def config(self) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        config = {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": 4,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
        }
        if self.force_upcast is not None:
            config["force_upcast"] = self.force_upcast
        return config


@dataclass(frozen=True)
class TextEncoderSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    projection_dim: int


@dataclass(frozen=True)
class TokenizerSpec:
    vocab_size: int
    pad_token: str  # SD 1: "<|endoftext|>"; SD 2 (OpenCLIP): "!"


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    prediction_type: str
    extra: tuple[tuple[str, Any], ...] = ()  # (key, value) pairs a model's config adds to SD 1/2's

    def config(self) -> dict[str, Any]:
        """As in scheduler_config.json of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
        and, with ``extra``, stabilityai/stable-diffusion-xl-base-1.0."""
        return {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "trained_betas": None,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "prediction_type": self.prediction_type,
            "timestep_spacing": "leading",
            **dict(self.extra),
        }


@dataclass(frozen=True)
class PresetSpec:
    """A preset's architecture. SDXL presets add ``text_encoder_2`` (a CLIPTextModelWithProjection, whose
    projected pooled output feeds the UNet's text_time conditioning) and its ``tokenizer_2``.

    Raises ValueError when the parts do not fit together (cross-attention width, pooled width).
    """

    unet: UNetSpec
    vae: VaeSpec
    text_encoder: TextEncoderSpec
    tokenizer: TokenizerSpec
    scheduler: SchedulerSpec
    text_encoder_2: TextEncoderSpec | None = None
    tokenizer_2: TokenizerSpec | None = None

    def __post_init__(self) -> None:
        if (self.text_encoder_2 is None) != (self.tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 come together")
        context = sum(te.hidden_size for _, te, _ in self.text_encoders())
        if self.unet.cross_attention_dim != context:
            width = self.unet.cross_attention_dim
            raise ValueError(f"UNet cross_attention_dim {width} != context width {context}")
        pooled = None if self.text_encoder_2 is None else self.text_encoder_2.projection_dim
        if (None if self.unet.text_time is None else self.unet.text_time.pooled_dim) != pooled:
            raise ValueError(f"UNet text_time conditioning {self.unet.text_time} != pooled width {pooled}")

    @property
    def is_xl(self) -> bool:
        """Whether this is an SDXL preset (two text encoders, text_time conditioning)."""
        return self.text_encoder_2 is not None

    def text_encoders(self) -> tuple[tuple[str, TextEncoderSpec, TokenizerSpec], ...]:
        """(folder name, encoder, its tokenizer) per text encoder, in context order: SDXL's context is
        text_encoder's hidden states joined with text_encoder_2's along the feature axis."""
        first = (("text_encoder", self.text_encoder, self.tokenizer),)
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            return first
        return (*first, ("text_encoder_2", self.text_encoder_2, self.tokenizer_2))

    def tokenizers(self) -> tuple[tuple[str, TokenizerSpec], ...]:
        """(folder name, spec) per tokenizer: "tokenizer", and "tokenizer_2" on SDXL."""
        names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
        return tuple((names[name], tokenizer) for name, _, tokenizer in self.text_encoders())


_SD_VAE = VaeSpec(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512
)
_TINY_VAE = VaeSpec(
    block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64
)
_SDXL_VAE = VaeSpec(
    _SD_VAE.block_out_channels, 2, 32, sample_size=1024, scaling_factor=0.13025, force_upcast=True
)
_TINY_XL_VAE = VaeSpec(
    _TINY_VAE.block_out_channels, 1, 8, sample_size=64, scaling_factor=0.13025, force_upcast=True
)
_EPSILON = SchedulerSpec(class_name="PNDMScheduler", prediction_type="epsilon")
_V_PREDICTION = SchedulerSpec(class_name="DDIMScheduler", prediction_type="v_prediction")
_SDXL_EULER = SchedulerSpec(
    class_name="EulerDiscreteScheduler",
    prediction_type="epsilon",
    extra=(("interpolation_type", "linear"), ("sample_max_value", 1.0), ("use_karras_sigmas", False)),
)
# SDXL base 1.0's encoders: OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (projected, "!" padding).
_CLIP_L = TextEncoderSpec(768, 12, 12, 3072, "quick_gelu", projection_dim=768)
_OPENCLIP_BIGG = TextEncoderSpec(1280, 32, 20, 5120, "gelu", projection_dim=1280)

_SPECS: Mapping[Preset, PresetSpec] = MappingProxyType(
    {
        Preset.TINY: PresetSpec(
            unet=UNetSpec(
                block_out_channels=(32, 32, 64, 64),
                layers_per_block=1,
                attention_head_dim=2,
                cross_attention_dim=32,
                norm_num_groups=8,
                sample_size=8,
            ),
            vae=_TINY_VAE,
            text_encoder=TextEncoderSpec(32, 2, 2, 64, "quick_gelu", projection_dim=32),
            tokenizer=TokenizerSpec(vocab_size=1000, pad_token=EOS_TOKEN),
            scheduler=_EPSILON,
        ),
        Preset.TINY_V: PresetSpec(
            unet=UNetSpec(
                block_out_channels=(32, 32, 64, 64),
                layers_per_block=1,
                attention_head_dim=(2, 2, 4, 4),
                cross_attention_dim=64,
                norm_num_groups=8,
                sample_size=8,
                use_linear_projection=True,
                upcast_attention=True,
            ),
            vae=_TINY_VAE,
            text_encoder=TextEncoderSpec(64, 2, 4, 128, "gelu", projection_dim=32),
            tokenizer=TokenizerSpec(vocab_size=1000, pad_token="!"),
            scheduler=_V_PREDICTION,
        ),
        # Every width distinct (32, 64, projection 40, context 96, text_time input 88), so a mix-up fails.
        Preset.TINY_XL: PresetSpec(
            unet=UNetSpec(
                block_out_channels=(32, 64, 128),
                layers_per_block=1,
                attention_head_dim=(2, 4, 8),
                cross_attention_dim=32 + 64,
                norm_num_groups=8,
                sample_size=8,
                use_linear_projection=True,
                layout=UNetLayout.SDXL,
                transformer_layers_per_block=(1, 1, 2),
                text_time=TextTimeSpec(time_embed_dim=8, pooled_dim=40),
            ),
            vae=_TINY_XL_VAE,
            text_encoder=TextEncoderSpec(32, 2, 2, 64, "quick_gelu", projection_dim=32),
            tokenizer=TokenizerSpec(vocab_size=1000, pad_token=EOS_TOKEN),
            text_encoder_2=TextEncoderSpec(64, 3, 4, 128, "gelu", projection_dim=40),
            tokenizer_2=TokenizerSpec(vocab_size=1000, pad_token="!"),
            scheduler=_SDXL_EULER,
        ),
        Preset.SD15: PresetSpec(
            unet=UNetSpec(
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                attention_head_dim=8,
                cross_attention_dim=768,
                norm_num_groups=32,
                sample_size=64,
            ),
            vae=_SD_VAE,
            text_encoder=TextEncoderSpec(768, 12, 12, 3072, "quick_gelu", projection_dim=768),
            tokenizer=TokenizerSpec(vocab_size=49408, pad_token=EOS_TOKEN),
            scheduler=_EPSILON,
        ),
        Preset.SD21: PresetSpec(
            unet=UNetSpec(
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                attention_head_dim=(5, 10, 20, 20),
                cross_attention_dim=1024,
                norm_num_groups=32,
                sample_size=96,
                use_linear_projection=True,
                upcast_attention=True,
            ),
            vae=VaeSpec(_SD_VAE.block_out_channels, 2, 32, sample_size=768),
            text_encoder=TextEncoderSpec(1024, 23, 16, 4096, "gelu", projection_dim=512),
            tokenizer=TokenizerSpec(vocab_size=49408, pad_token="!"),
            scheduler=_V_PREDICTION,
        ),
        # stabilityai/stable-diffusion-xl-base-1.0's configs (upcast_attention: null there, False here).
        Preset.SDXL: PresetSpec(
            unet=UNetSpec(
                block_out_channels=(320, 640, 1280),
                layers_per_block=2,
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=768 + 1280,
                norm_num_groups=32,
                sample_size=128,
                use_linear_projection=True,
                layout=UNetLayout.SDXL,
                transformer_layers_per_block=(1, 2, 10),
                text_time=TextTimeSpec(time_embed_dim=256, pooled_dim=1280),
            ),
            vae=_SDXL_VAE,
            text_encoder=_CLIP_L,
            tokenizer=TokenizerSpec(vocab_size=49408, pad_token=EOS_TOKEN),
            text_encoder_2=_OPENCLIP_BIGG,
            tokenizer_2=TokenizerSpec(vocab_size=49408, pad_token="!"),
            scheduler=_SDXL_EULER,
        ),
    }
)


def parse_preset(preset: Preset | str) -> Preset:
    """The preset named ``preset``; ValueError listing the valid names otherwise."""
    try:
        return Preset(preset)
    except ValueError:
        valid = ", ".join(p.value for p in Preset)
        raise ValueError(f"unknown preset {preset!r}; valid presets: {valid}") from None


def preset_spec(preset: Preset | str) -> PresetSpec:
    return _SPECS[parse_preset(preset)]


# --- tokenizer -------------------------------------------------------------------------------


def _letter_rank_sum(text: str) -> int:
    return sum(_LETTERS.index(c) for c in text)


def _synthetic_merges() -> Iterator[tuple[str, str]]:
    """Endless, deterministic merges: prefix + letter, by level, most frequent letters first.

    Each merge's left part is a single letter or the result of an earlier merge, so every merge is
    reachable and the BPE is consistent. Every extension comes as a word-final ``</w>`` merge and
    a word-internal one.
    """
    prefixes = list(_LETTERS)
    while True:
        extended = sorted((p + c for p in prefixes for c in _LETTERS), key=lambda s: (_letter_rank_sum(s), s))
        for token in extended:
            yield token[:-1], token[-1] + "</w>"
            yield token[:-1], token[-1]
        prefixes = extended[:_PREFIXES_PER_LEVEL]


def clip_vocabulary(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A synthetic CLIP BPE with real CLIP's id layout: bytes, bytes + "</w>", merges, BOS, EOS.

    For vocab_size 49,408 the specials land on 49406 / 49407 and "!" on 0, as in real CLIP.
    """
    base = bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base]
    num_merges = vocab_size - len(tokens) - 2
    if num_merges < 0:
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(tokens) + 2} byte-level and special tokens"
        )
    merges: list[tuple[str, str]] = []
    for left, right in _synthetic_merges():
        if len(merges) == num_merges:
            break
        merges.append((left, right))
        tokens.append(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def special_token_id(token: str, vocab_size: int) -> int:
    """Id of BOS, EOS or a single byte-level character, without building the vocabulary."""
    if token in (BOS_TOKEN, EOS_TOKEN):
        return vocab_size - 2 + (token == EOS_TOKEN)
    return bytes_to_unicode().index(token)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer(directory: Path, spec: TokenizerSpec) -> None:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json as in SD's tokenizer/."""
    vocab, merges = clip_vocabulary(spec.vocab_size)
    directory.mkdir(parents=True)
    _write_json(directory / "vocab.json", vocab)
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    write_atomic(directory / "merges.txt", "\n".join(lines) + "\n")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": spec.pad_token,
        "unk_token": EOS_TOKEN,
    }
    _write_json(directory / "special_tokens_map.json", specials)
    config = {
        "add_prefix_space": False,
        **specials,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_TOKENS,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_json(directory / "tokenizer_config.json", dict(sorted(config.items())))


# --- networks --------------------------------------------------------------------------------

# diffusers shards weights above 10 GB by default; SDXL's fp32 UNet (10.3 GB) stays one file, as in
# the real model folder (sharded folders are not read yet).
_ONE_FILE = "100GB"
# Parameter count above which a network is followed by a full garbage collection. One takes ~0.25 s
# with torch, diffusers and transformers loaded: most of a tiny preset's build time, for nothing.
_COLLECT_ABOVE = 10_000_000


def component_seed(seed: int, component: str) -> int:
    """Independent seed per component, so adding or reordering components changes nothing else."""
    digest = hashlib.sha256(f"{seed}/{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _seeded(seed: int, component: str, build: Callable[[], Any]) -> Any:
    """Run ``build`` under a seeded global torch RNG, restored afterwards (module init uses it)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        return build()


def text_encoder_config(spec: PresetSpec, component: str = "text_encoder") -> Any:
    """CLIPTextConfig of ``component`` ("text_encoder", or "text_encoder_2" on SDXL presets) whose
    special-token ids match its tokenizer (the pooled output finds EOS by id).

    Raises ValueError for a component the preset does not have.
    """
    from transformers import CLIPTextConfig

    found = [(te, tok) for name, te, tok in spec.text_encoders() if name == component]
    if not found:
        names = ", ".join(name for name, _, _ in spec.text_encoders())
        raise ValueError(f"no text encoder {component!r} in this preset; it has: {names}")
    te, tokenizer = found[0]
    vocab_size = tokenizer.vocab_size
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=te.hidden_size,
        intermediate_size=te.intermediate_size,
        projection_dim=te.projection_dim,
        num_hidden_layers=te.num_hidden_layers,
        num_attention_heads=te.num_attention_heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=te.hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=special_token_id(tokenizer.pad_token, vocab_size),
    )


def text_encoder_class(component: str) -> str:
    """The transformers class of a text encoder folder: SDXL's second encoder carries the projection
    whose output is the pooled embedding (``text_embeds``)."""
    return "CLIPTextModelWithProjection" if component == "text_encoder_2" else "CLIPTextModel"


def _save_network(directory: Path, model: Any, **options: Any) -> int:
    """``model.save_pretrained(directory, **options)``; returns the parameter count."""
    model.save_pretrained(directory, **options)
    return sum(parameter.numel() for parameter in model.parameters())


def _save_text_encoder(directory: Path, spec: PresetSpec, seed: int) -> int:
    """The text encoder named as ``directory`` ("text_encoder" or "text_encoder_2"), seeded by that name."""
    import transformers

    component = directory.name
    config = text_encoder_config(spec, component)
    model_class = getattr(transformers, text_encoder_class(component))
    model = _seeded(seed, component, lambda: _trained_like_norms(model_class(config)))
    return _save_network(directory, model)  # transformers 5 always writes safetensors


def _trained_like_norms(model: Any) -> Any:
    """Layer norms with scales around 1 and biases around 0 instead of exactly 1 and 0, as trained CLIP
    has them: with zero biases every token's embedding has mean ~0, which makes A1111's mean-preserving
    prompt weighting (scale back to the original mean) divide by ~0 on a random model."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
    return model


def _save_unet(directory: Path, spec: PresetSpec, seed: int) -> int:
    from diffusers import UNet2DConditionModel

    model = _seeded(seed, "unet", lambda: UNet2DConditionModel(**spec.unet.config()))
    return _save_network(directory, model, safe_serialization=True, max_shard_size=_ONE_FILE)


def _save_vae(directory: Path, spec: PresetSpec, seed: int) -> int:
    from diffusers import AutoencoderKL

    model = _seeded(seed, "vae", lambda: AutoencoderKL(**spec.vae.config()))
    return _save_network(directory, model, safe_serialization=True, max_shard_size=_ONE_FILE)


def _save_scheduler(directory: Path, spec: PresetSpec) -> None:
    import diffusers

    scheduler_class = getattr(diffusers, spec.scheduler.class_name)
    scheduler_class.from_config(spec.scheduler.config()).save_pretrained(directory)


def _model_index(spec: PresetSpec) -> dict[str, Any]:
    """model_index.json's entries. SDXL: ``force_zeros_for_empty_prompt`` as in SDXL base 1.0, and
    ``add_watermarker`` false, so diffusers' output does not depend on whether invisible-watermark is
    installed."""
    import diffusers

    if spec.is_xl:
        pipeline: dict[str, Any] = {
            "_class_name": "StableDiffusionXLPipeline",
            "add_watermarker": False,
            "force_zeros_for_empty_prompt": True,
        }
    else:
        pipeline = {
            "_class_name": "StableDiffusionPipeline",
            "requires_safety_checker": False,
            "safety_checker": [None, None],
        }
    components = {
        "scheduler": ["diffusers", spec.scheduler.class_name],
        **{name: ["transformers", text_encoder_class(name)] for name, _, _ in spec.text_encoders()},
        **{name: ["transformers", "CLIPTokenizer"] for name, _ in spec.tokenizers()},
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    optional = {"feature_extractor": [None, None], "image_encoder": [None, None]}
    index = {**pipeline, "_diffusers_version": diffusers.__version__, **optional, **components}
    return dict(sorted(index.items()))


def _write_folder(directory: Path, spec: PresetSpec, seed: int) -> None:
    """One component at a time, each freed before the next, to bound peak memory at SD / SDXL size."""
    for name, tokenizer in spec.tokenizers():
        write_tokenizer(directory / name, tokenizer)
    _save_scheduler(directory / "scheduler", spec)
    networks = [(name, _save_text_encoder) for name, _, _ in spec.text_encoders()]
    for name, save in (*networks, ("vae", _save_vae), ("unet", _save_unet)):
        if save(directory / name, spec, seed) > _COLLECT_ABOVE:
            gc.collect()  # a safety net: the networks hold no reference cycles, they free on return
    _write_json(directory / "model_index.json", _model_index(spec))
    _match_weight_permissions(directory)


def _match_weight_permissions(directory: Path) -> None:
    """safetensors creates files 0600; give them the umask-derived mode of the files written here."""
    mode = (directory / "model_index.json").stat().st_mode & 0o777
    for weights in directory.glob("*/*.safetensors"):
        weights.chmod(mode)


# --- the folder ------------------------------------------------------------------------------


def init_random(preset: Preset | str, out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a diffusers folder with random weights for ``preset`` at ``out_dir``; returns its path.

    Built in a hidden folder beside ``out_dir`` and renamed into place, so a failure or interrupt
    leaves no partial model behind.
    """
    spec = preset_spec(preset)
    out_dir = Path(out_dir).absolute()
    with staged_folder(out_dir, overwrite) as tmp:
        _write_folder(tmp, spec, seed)
    return out_dir
