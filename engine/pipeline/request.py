"""A generation request: every setting of one `generate` call, validated before any work starts."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_SEED = 2**32 - 1
MAX_SIDE = 4096


@dataclass(frozen=True)
class StepInfo:
    """Progress after one UNet evaluation: ``step`` of ``total`` (1-based) at ``timestep``."""

    step: int
    total: int
    timestep: float


# Return False to cancel the generation (it then raises engine.errors.Cancelled).
StepCallback = Callable[[StepInfo], "bool | None"]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``prompts`` holds one entry per prompt; each makes ``batch_size`` images."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int = 20
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    clip_skip: int = 1
    width: int = 512
    height: int = 512
    sampler: str = "Euler a"
    seed: int = 0
    batch_size: int = 1
    latents: np.ndarray | None = field(default=None, compare=False)
    image: Any = field(default=None, compare=False)  # PIL.Image.Image or HxWx3 uint8 array: img2img
    strength: float = 0.8
    callback: StepCallback | None = field(default=None, compare=False)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.batch_size

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance only pays off above 1 (diffusers' rule)."""
        return self.guidance_scale > 1.0

    @property
    def is_img2img(self) -> bool:
        return self.image is not None


def make_request(
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = "",
    *,
    seed: int | None = None,
    vae_scale_factor: int = 8,
    latent_channels: int = 4,
    **settings: Any,
) -> GenerationRequest:
    """Normalize prompts and the seed, then validate; raises ValueError naming the bad value."""
    prompts = _prompt_tuple(prompt, "prompt")
    negatives = _prompt_tuple("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    request = GenerationRequest(prompts, negatives, seed=seed, **settings)
    validate(request, vae_scale_factor, latent_channels)
    return request


def _prompt_tuple(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    return items


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def validate(request: GenerationRequest, vae_scale_factor: int = 8, latent_channels: int = 4) -> None:
    """Check every setting; the first bad one raises ValueError with a one-line message."""
    r = request
    _require(
        _is_int(r.steps) and 1 <= r.steps <= 1000, f"steps must be an integer in 1..1000, got {r.steps!r}"
    )
    for name, side in (("width", r.width), ("height", r.height)):
        _require(
            _is_int(side) and vae_scale_factor <= side <= MAX_SIDE and side % vae_scale_factor == 0,
            f"{name} must be a multiple of {vae_scale_factor} up to {MAX_SIDE}, got {side!r}",
        )
    _require(
        isinstance(r.guidance_scale, int | float) and 0 <= r.guidance_scale <= 100,
        f"guidance_scale must be a number in [0, 100], got {r.guidance_scale!r}",
    )
    _require(
        isinstance(r.guidance_rescale, int | float) and 0 <= r.guidance_rescale <= 1,
        f"guidance_rescale must be in [0, 1], got {r.guidance_rescale!r}",
    )
    _require(r.clip_skip in (1, 2), f"clip_skip must be 1 or 2, got {r.clip_skip!r}")
    _require(
        _is_int(r.batch_size) and 1 <= r.batch_size <= 64,
        f"batch_size must be in 1..64, got {r.batch_size!r}",
    )
    _require(
        _is_int(r.seed) and 0 <= r.seed <= MAX_SEED,
        f"seed must be an integer in 0..{MAX_SEED}, got {r.seed!r}",
    )
    _require(
        r.seed + r.num_images - 1 <= MAX_SEED,
        f"seed {r.seed} + {r.num_images} images runs past the largest seed {MAX_SEED}",
    )
    _require(
        isinstance(r.strength, int | float) and 0 < r.strength <= 1,
        f"strength must be in (0, 1], got {r.strength!r}",
    )
    _validate_sampler(r.sampler)
    _validate_latents(r, vae_scale_factor, latent_channels)


def _validate_sampler(sampler: str) -> None:
    from engine.schedulers import names

    valid = names()
    lowered = {n.lower() for n in valid}
    _require(
        isinstance(sampler, str) and sampler.lower() in lowered,
        f"unknown sampler {sampler!r}; valid samplers: {', '.join(valid)}",
    )


def _validate_latents(request: GenerationRequest, vae_scale_factor: int, channels: int) -> None:
    if request.latents is None:
        return
    expected = (
        request.num_images,
        channels,
        request.height // vae_scale_factor,
        request.width // vae_scale_factor,
    )
    shape = tuple(getattr(request.latents, "shape", ()))
    _require(shape == expected, f"latents must have shape {list(expected)}, got {list(shape)}")
