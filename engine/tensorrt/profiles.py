"""TensorRT optimization profiles computed from the spec tables: min / opt / max shapes per input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from engine.errors import BuildError
from engine.specs import (
    GraphSpec,
    ModelDims,
    Network,
    axis_sizes,
)

Range = tuple[int, int, int]


class ProfileKind(str, Enum):
    STATIC = "static"  # min = opt = max: the fastest kernels, one profile per (batch, size)
    DYNAMIC = "dynamic"  # one profile spanning ranges of batch, height and width


def _check_range(name: str, values: Range, multiple: int = 1) -> Range:
    low, opt, high = (int(v) for v in values)
    if not 0 < low <= opt <= high:
        raise BuildError(f"{name} range must satisfy 0 < min <= opt <= max, got {list(values)}")
    bad = [v for v in (low, opt, high) if v % multiple]
    if bad:
        raise BuildError(f"{name} must be a multiple of {multiple}, got {bad[0]}")
    return low, opt, high


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile in request terms: images per request and pixel sizes.

    Each field is (min, opt, max). ``sequence`` is the text length the UNet sees (77 tokens per prompt
    chunk; 154 and more for long prompts). Heights and widths are pixels, multiples of 8.
    """

    batch: Range
    height: Range
    width: Range
    sequence: Range = (77, 77, 77)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", _check_range("batch", self.batch))
        object.__setattr__(self, "height", _check_range("height", self.height, 8))
        object.__setattr__(self, "width", _check_range("width", self.width, 8))
        object.__setattr__(self, "sequence", _check_range("sequence", self.sequence))

    @classmethod
    def static(cls, batch: int, height: int, width: int, sequence: int = 77) -> ShapeProfile:
        return cls((batch,) * 3, (height,) * 3, (width,) * 3, (sequence,) * 3)

    @property
    def is_static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width, self.sequence))

    @property
    def label(self) -> str:
        """Short name for logs and file listings, e.g. ``b1-512x512`` or ``b1..4-256x256..1024x1024``."""

        def span(values: Range) -> str:
            return str(values[0]) if values[0] == values[2] else f"{values[0]}..{values[2]}"

        sizes = f"{self.width[0]}x{self.height[0]}"
        if (self.width[0], self.height[0]) != (self.width[2], self.height[2]):
            sizes += f"..{self.width[2]}x{self.height[2]}"
        text = "" if self.sequence == (77, 77, 77) else f"-t{span(self.sequence)}"
        return f"b{span(self.batch)}-{sizes}{text}"

    def to_json(self) -> dict[str, list[int]]:
        return {k: list(getattr(self, k)) for k in ("batch", "height", "width", "sequence")}


def make_profiles(
    kind: ProfileKind,
    batches: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    max_tokens: int = 77,
    min_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
) -> tuple[ShapeProfile, ...]:
    """Profiles covering batches x sizes ((width, height) pixels); the first batch and size are opt.

    Static: one profile per (batch, size). Dynamic: one profile from the smallest to the largest of
    each (or min_size / max_size). Text longer than 77 tokens makes the sequence axis dynamic.
    """
    if not batches or not sizes:
        raise BuildError("at least one batch size and one image size are needed")
    sequence = (77, 77, max_tokens)
    if kind is ProfileKind.STATIC:
        return tuple(
            ShapeProfile((b,) * 3, (h,) * 3, (w,) * 3, sequence)
            for b in batches
            for w, h in dict.fromkeys(sizes)
        )
    (opt_w, opt_h), opt_b = sizes[0], batches[0]
    low_w, low_h = min_size or (min(w for w, _ in sizes), min(h for _, h in sizes))
    high_w, high_h = max_size or (max(w for w, _ in sizes), max(h for _, h in sizes))
    return (
        ShapeProfile(
            (min(batches), opt_b, max(batches)),
            (min(low_h, opt_h), opt_h, max(high_h, opt_h)),
            (min(low_w, opt_w), opt_w, max(high_w, opt_w)),
            sequence,
        ),
    )


Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class DefaultSizes:
    """A model family's build sizes when no ``--size`` is given: ``opt`` is the static profile's size and
    the dynamic profile's opt; ``low`` / ``high`` are the dynamic profile's smallest / largest image."""

    opt: Size
    low: Size
    high: Size


# SD 1.x / 2.x: 512x512 only (as before family defaults existed).
SD_SIZES = DefaultSizes((512, 512), (512, 512), (512, 512))
# SDXL: trained at 1024x1024 and then at ~1 megapixel in aspect buckets; the ones SDXL front ends offer
# run from 1536x640 to 640x1536, so a dynamic profile spans 640..1536 px on both sides.
XL_SIZES = DefaultSizes((1024, 1024), (640, 640), (1536, 1536))
FAMILY_SIZES = {"sdxl": XL_SIZES}


def default_sizes(model_family: str) -> DefaultSizes:
    """The default build sizes of a manifest's ``model_family`` ("sdxl": 1024 px; others: 512 px)."""
    return FAMILY_SIZES.get(model_family, SD_SIZES)


def default_profiles(
    model_family: str,
    kind: ProfileKind = ProfileKind.STATIC,
    batches: Sequence[int] = (1,),
    max_tokens: int = 77,
) -> tuple[ShapeProfile, ...]:
    """Profiles at the family's default sizes: static at ``opt``; dynamic from ``low`` to ``high``."""
    sizes = default_sizes(model_family)
    return make_profiles(kind, batches, [sizes.opt], max_tokens, sizes.low, sizes.high)


def network_batch(network: Network, profile: ShapeProfile) -> Range:
    """The batch axis of one network for a profile.

    UNet: from the images (guidance off) to 2 x images (guidance with rescale, which the
    fused-guidance UNet cannot do); opt at 2 x images. Text encoders (SDXL's two alike): 1 up to the
    images, since the pipeline encodes only prompts its embedding cache lacks. VAE and the fused-guidance
    UNet (whose embeddings' batch, SDXL's text_embeds and time_ids included, is twice this): the images.
    """
    low, opt, high = profile.batch
    if network is Network.UNET:
        return low, 2 * opt, 2 * high
    if network in (Network.TEXT_ENCODER, Network.TEXT_ENCODER_2):
        return 1, opt, high
    return low, opt, high


def axis_ranges(network: Network, profile: ShapeProfile, dims: ModelDims) -> tuple[dict[str, int], ...]:
    """(min, opt, max) sizes of every symbolic axis of the specs for one network and profile."""
    factor = dims.vae_scale_factor
    for name, values in (("height", profile.height), ("width", profile.width)):
        bad = [v for v in values if v % factor]
        if bad:
            raise BuildError(f"image {name} {bad[0]} is not a multiple of the VAE scale factor {factor}")
    chunk = dims.text_max_length
    if any(v % chunk for v in profile.sequence):
        raise BuildError(f"text sequence {list(profile.sequence)} must be multiples of {chunk} tokens")
    batch = network_batch(network, profile)
    return tuple(
        axis_sizes(
            batch[i], profile.height[i] // factor, profile.width[i] // factor, factor, profile.sequence[i]
        )
        for i in range(3)
    )


def profile_shapes(
    spec: GraphSpec, profile: ShapeProfile, dims: ModelDims
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min / opt / max shape of every input with a symbolic axis, straight from the spec table."""
    sizes = axis_ranges(spec.network, profile, dims)
    return {
        tensor.name: tuple(tensor.shape(s) for s in sizes)  # type: ignore[misc]
        for tensor in spec.inputs
        if tensor.symbols()
    }
