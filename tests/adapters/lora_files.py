"""LoRA test files in every format sd-engine reads, written as the trainers write them.

Reusable by end-to-end tests: ``lora_targets_of(unet, text_encoder)`` gives an engine's targets from
the torch modules, and each ``write_*`` function writes one .safetensors file over any subset of them
with seeded random factors (non-zero "up" halves, so every delta is visible):

- :func:`write_kohya_lora`: kohya / A1111 (``lora_unet_*`` / ``lora_te_*``, ``lora_down`` / ``lora_up``
  / ``alpha``), diffusers or LDM UNet names, 4-D or 2-D 1x1-conv factors, LoCon Tucker mids, DoRA;
- :func:`write_peft_lora`: built by peft on the real diffusers modules and saved by diffusers' own
  ``save_lora_weights``, so every key and the adapter metadata are spelled as diffusers writes them;
- :func:`write_loha`, :func:`write_lokr`: LyCORIS LoHa (with or without Tucker cores) and LoKr (whole
  or factorised halves, ``lokr_w1_a`` spelling, Tucker ``lokr_t2``);
- :func:`write_sdxl_like_lora`, :func:`write_sd2_width_lora`: files of another base family.

Torch, peft and diffusers are imported only by the functions that need them.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from engine.adapters import Component, Target, ldm_unet_paths

Targets = Mapping[Target, tuple[int, ...]]
KOHYA_PREFIXES = {
    Component.UNET: "lora_unet_",
    Component.TEXT_ENCODER: "lora_te_text_model_",
    Component.TEXT_ENCODER_2: "lora_te2_text_model_",
}


# -- targets --------------------------------------------------------------------------------------

# A few modules of each kind, small and with unequal sides (so a transposed factor cannot pass):
# attention Linear, cross-attention with a narrower context, 1x1 convs (SD 1 proj_in, a shortcut), a 3x3
# conv, text encoder projections. Sides factor for LoKr (16 = 4*4, 8 = 2*4, 12 = 3*4, 24 = 4*6).
SMALL_TARGETS: Mapping[Target, tuple[int, ...]] = {
    (Component.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): (16, 16),
    (Component.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"): (16, 12),
    (Component.UNET, "down_blocks.0.attentions.0.proj_in"): (16, 16, 1, 1),
    (Component.UNET, "down_blocks.0.resnets.0.conv1"): (16, 8, 3, 3),
    (Component.UNET, "down_blocks.0.resnets.0.conv_shortcut"): (16, 8, 1, 1),
    (Component.TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj"): (12, 12),
    (Component.TEXT_ENCODER, "encoder.layers.0.mlp.fc1"): (24, 12),
}


def lora_targets_of(
    unet: Any, text_encoder: Any = None, text_encoder_2: Any = None
) -> dict[Target, tuple[int, ...]]:
    """Every Linear and Conv2d weight of the torch modules -> its shape: UNet paths as
    ``UNet2DConditionModel.named_modules`` gives them, text encoder paths relative to the
    CLIPTextTransformer (``text_model.`` stripped)."""
    import torch

    targets: dict[Target, tuple[int, ...]] = {}
    for component, module in (
        (Component.UNET, unet),
        (Component.TEXT_ENCODER, text_encoder),
        (Component.TEXT_ENCODER_2, text_encoder_2),
    ):
        if module is None:
            continue
        root = getattr(module, "text_model", module)
        for name, layer in root.named_modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                targets[(component, name)] = tuple(layer.weight.shape)
    return targets


def weights_of(unet: Any, text_encoder: Any, targets: Iterable[Target]) -> dict[Target, np.ndarray]:
    """Copies of the torch modules' current weights (a peft-wrapped layer's base weight), as NumPy."""
    weights = {}
    for component, path in targets:
        model = unet if component is Component.UNET else text_encoder
        model = getattr(model, "text_model", model) if component is not Component.UNET else model
        layer = model.get_submodule(path)
        weights[(component, path)] = getattr(layer, "base_layer", layer).weight.detach().numpy().copy()
    return weights


def select(
    targets: Targets, *fragments: str, component: Component | None = None
) -> dict[Target, tuple[int, ...]]:
    """The targets whose path contains any of ``fragments`` (all when none), of one component or all."""
    return {
        t: shape
        for t, shape in targets.items()
        if (component is None or t[0] is component) and (not fragments or any(f in t[1] for f in fragments))
    }


def kohya_name(target: Target, ldm: Mapping[str, str] | None = None) -> str:
    """kohya's module name of a target (``lora_unet_down_blocks_0_...``); with ``ldm`` (diffusers ->
    LDM UNet paths) the UNet's LDM spelling (``lora_unet_input_blocks_1_1_...``)."""
    component, path = target
    if ldm is not None and component is Component.UNET:
        path = ldm[path]
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


# -- factors --------------------------------------------------------------------------------------


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def lora_factors(
    rng: np.random.Generator, shape: tuple[int, ...], rank: int, conv_layout: str = "4d", mid: bool = False
) -> dict[str, np.ndarray]:
    """lora_down / lora_up (/ lora_mid) for a weight of ``shape``, as kohya stores them: Linear (r, in)
    and (out, r); conv (r, in, kh, kw) and (out, r, 1, 1); ``conv_layout="2d"`` stores 1x1-conv factors
    as matrices; ``mid`` gives 3x3 convs LoCon's Tucker layout ((r, in, 1, 1), (r, r, kh, kw))."""
    out, inputs, *kernel = shape
    fan_in = inputs * math.prod(kernel)
    flat = not kernel or (conv_layout == "2d" and math.prod(kernel) == 1)
    tucker = mid and math.prod(kernel) > 1
    ones = () if flat else (1,) * len(kernel)
    # drawn in one order for every layout, so one seed gives the same numbers in 2-D and 4-D files
    factors = {
        "lora_down.weight": _normal(rng, (rank, inputs, *(ones if tucker or flat else kernel)), fan_in**-0.5)
    }
    if tucker:
        factors["lora_mid.weight"] = _normal(rng, (rank, rank, *kernel), 0.3)
    factors["lora_up.weight"] = _normal(rng, (out, rank, *ones), 0.1)
    return factors


def dora_scale(rng: np.random.Generator, base: np.ndarray, layout: str) -> np.ndarray:
    """A DoRA magnitude near the base weight's norms: ``layout`` "out" (out, 1[, 1, 1]) per output
    channel, "in" (1, in[, 1, 1]) per input channel (kohya's and LyCORIS's default)."""
    axis = 0 if layout == "out" else 1
    others = tuple(a for a in range(base.ndim) if a != axis)
    norm = np.sqrt(np.sum(np.square(base.astype(np.float32)), axis=others, keepdims=True))
    return (norm * rng.uniform(0.8, 1.2, norm.shape)).astype(np.float32)


def save_lora(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (contiguous copies) and ``metadata`` as a .safetensors file; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    # None, not {}: safetensors 0.8 writes a broken header for no tensors with empty metadata
    save_file(arrays, str(path), metadata=dict(metadata) if metadata else None)
    return path


def _alpha(value: float, dtype: Any) -> np.ndarray:
    return np.asarray(value, dtype=dtype).reshape(())


# -- writers --------------------------------------------------------------------------------------


def write_kohya_lora(
    path: Path,
    targets: Targets,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    conv_layout: str = "4d",
    mid: bool = False,
    ldm_names: bool = False,
    dtype: Any = np.float32,
    alpha_dtype: Any = np.float32,
    dora: str | None = None,
    base_weights: Mapping[Target, np.ndarray] | None = None,
    metadata: Mapping[str, str] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """A kohya / A1111 LoRA over ``targets``: per module ``<name>.lora_down.weight``, ``.lora_up.weight``
    and, unless ``alpha`` is None, a 0-d ``.alpha`` of ``alpha_dtype``. ``ldm_names``: UNet modules in
    the LDM spelling; ``dora`` "out" / "in": ``.dora_scale`` magnitudes (needs ``base_weights``);
    ``extra``: more tensors written as they are (stray keys)."""
    rng = np.random.default_rng(seed)
    ldm = ldm_unet_paths(p for c, p in targets if c is Component.UNET) if ldm_names else None
    tensors: dict[str, np.ndarray] = {}
    for target, shape in targets.items():
        name = kohya_name(target, ldm)
        for suffix, array in lora_factors(rng, shape, rank, conv_layout, mid).items():
            tensors[f"{name}.{suffix}"] = array.astype(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = _alpha(alpha, alpha_dtype)
        if dora is not None:
            assert base_weights is not None, "DoRA magnitudes need the base weights"
            tensors[f"{name}.dora_scale"] = dora_scale(rng, base_weights[target], dora).astype(dtype)
    return save_lora(path, {**tensors, **(extra or {})}, metadata)


def write_loha(
    path: Path,
    targets: Targets,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    tucker: bool = False,
) -> Path:
    """A LyCORIS LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*kh*kw), the same for w2; with
    ``tucker`` a conv with a kernel gets LyCORIS's Tucker layout (``hada_t1`` (r, r, kh, kw),
    ``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in))."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for target, shape in targets.items():
        name = kohya_name(target)
        out, inputs, *kernel = shape
        for n in (1, 2):
            if tucker and math.prod(kernel) > 1:
                tensors[f"{name}.hada_t{n}"] = _normal(rng, (rank, rank, *kernel), 0.3)
                tensors[f"{name}.hada_w{n}_a"] = _normal(rng, (rank, out), 0.3)
                tensors[f"{name}.hada_w{n}_b"] = _normal(rng, (rank, inputs), 0.3)
            else:
                tensors[f"{name}.hada_w{n}_a"] = _normal(rng, (out, rank), 0.3)
                tensors[f"{name}.hada_w{n}_b"] = _normal(rng, (rank, inputs * math.prod(kernel)), 0.3)
        if alpha is not None:
            tensors[f"{name}.alpha"] = _alpha(alpha, np.float32)
    return save_lora(path, tensors)


def kron_split(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension, m the divisor nearest the square root (at most ``factor``
    when > 0): LyCORIS's ``factorization`` for the sizes tests use."""
    limit = factor if factor > 0 else dimension
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= limit)
    return m, dimension // m


def lokr_factors(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    rank: int,
    factor: int = -1,
    decompose_w1: bool = False,
    decompose_w2: bool = True,
    tucker: bool = False,
) -> dict[str, np.ndarray]:
    """LoKr factors for a weight of ``shape`` (out = a*c, in = b*d): ``lokr_w1`` (a, b) or
    ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, b); ``lokr_w2`` (c, d[, kh, kw]) or ``lokr_w2_a`` (c, r) @
    ``lokr_w2_b`` (r, d*kh*kw), or with ``tucker`` ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, c),
    ``lokr_w2_b`` (r, d)."""
    out, inputs, *kernel = shape
    (a, c), (b, d) = kron_split(out, factor), kron_split(inputs, factor)
    tensors: dict[str, np.ndarray] = {}
    if decompose_w1:
        tensors["lokr_w1_a"], tensors["lokr_w1_b"] = (
            _normal(rng, (a, rank), 0.5),
            _normal(rng, (rank, b), 0.5),
        )
    else:
        tensors["lokr_w1"] = _normal(rng, (a, b), 0.5)
    if not decompose_w2:
        tensors["lokr_w2"] = _normal(rng, (c, d, *kernel), 0.2)
    elif tucker and math.prod(kernel) > 1:
        tensors["lokr_t2"] = _normal(rng, (rank, rank, *kernel), 0.3)
        tensors["lokr_w2_a"], tensors["lokr_w2_b"] = (
            _normal(rng, (rank, c), 0.3),
            _normal(rng, (rank, d), 0.3),
        )
    else:
        tensors["lokr_w2_a"] = _normal(rng, (c, rank), 0.3)
        tensors["lokr_w2_b"] = _normal(rng, (rank, d * math.prod(kernel)), 0.3)
    return tensors


def write_lokr(
    path: Path,
    targets: Targets,
    rank: int = 2,
    alpha: float | None = 1.0,
    seed: int = 0,
    factor: int = -1,
    decompose_w1: bool = False,
    decompose_w2: bool = True,
    tucker: bool = False,
) -> Path:
    """A LyCORIS LoKr over ``targets`` (see :func:`lokr_factors` for the layouts)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for target, shape in targets.items():
        name = kohya_name(target)
        for suffix, array in lokr_factors(
            rng, shape, rank, factor, decompose_w1, decompose_w2, tucker
        ).items():
            tensors[f"{name}.{suffix}"] = array
        if alpha is not None:
            tensors[f"{name}.alpha"] = _alpha(alpha, np.float32)
    return save_lora(path, tensors)


def write_peft_lora(
    path: Path,
    unet: Any,
    text_encoder: Any,
    unet_modules: Iterable[str],
    text_modules: Iterable[str] = (),
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 0,
    metadata: bool = True,
    alpha_pattern: Mapping[str, float] | None = None,
    use_dora: bool = False,
) -> Path:
    """A diffusers / PEFT LoRA: peft adapters (random A and B) added to copies of the modules, saved by
    diffusers' ``StableDiffusionPipeline.save_lora_weights``; ``metadata`` stores the adapter configs
    (diffusers' ``lora_adapter_metadata``: alpha, rank, patterns), without which a loader assumes
    alpha = rank. Module names: UNet paths, text encoder paths without ``text_model.``."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    layers: dict[str, Any] = {}
    text_prefix = "text_model." if hasattr(text_encoder, "text_model") else ""  # transformers < 5 nests it
    for role, module, names in (
        ("unet", unet, list(unet_modules)),
        ("text_encoder", text_encoder, [f"{text_prefix}{m}" for m in text_modules]),
    ):
        if not names:
            continue
        model = copy.deepcopy(module)
        patterns = {k: v for k, v in (alpha_pattern or {}).items() if any(n.endswith(k) for n in names)}
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=names,
            init_lora_weights=False,
            alpha_pattern=patterns,
            use_dora=use_dora,
        )
        # what `add_adapter` does in diffusers and transformers (whose 5.x wants a peft newer than PyPI's)
        inject_adapter_in_model(config, model)
        model.peft_config = {"default": config}
        layers[f"{role}_lora_layers"] = get_peft_model_state_dict(model)
        if metadata:
            layers[f"{role}_lora_adapter_metadata"] = config.to_dict()
    with tempfile.TemporaryDirectory() as folder:
        StableDiffusionPipeline.save_lora_weights(folder, weight_name="lora.safetensors", **layers)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(folder) / "lora.safetensors", path)
    return path


def write_sdxl_like_lora(path: Path, rank: int = 1) -> Path:
    """An SDXL-shaped kohya LoRA (tiny rank): LDM UNet names with a second transformer block and
    2048-wide cross-attention, ``lora_te1_`` / ``lora_te2_`` text encoders, SDXL metadata."""
    rng = np.random.default_rng(0)
    shapes = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (640, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }
    tensors: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        for suffix, array in lora_factors(rng, shape, rank).items():
            tensors[f"{name}.{suffix}"] = array
        tensors[f"{name}.alpha"] = _alpha(rank, np.float16)
    return save_lora(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "[XL]test"})


def write_sd2_width_lora(path: Path, targets: Targets, rank: int = 1) -> Path:
    """A kohya LoRA whose text encoder projections read 1024-wide inputs (OpenCLIP ViT-H, SD 2.x),
    named after ``targets``' text encoder modules."""
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for target, shape in select(targets, "self_attn", component=Component.TEXT_ENCODER).items():
        for suffix, array in lora_factors(rng, (shape[0], 1024), rank).items():
            tensors[f"{kohya_name(target)}.{suffix}"] = array
    return save_lora(path, tensors)
