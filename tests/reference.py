"""Reference helpers for tests: diffusers pipelines configured like an engine sampler, and PSNR."""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from engine import parity
from engine.sampling.registry import lookup


def psnr(ours: Image.Image | np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB between a uint8 image and a float [0, 1] reference rounded like diffusers' PIL output."""
    rounded = (np.asarray(reference, dtype=np.float64) * 255).round()
    return parity.psnr(rounded, np.asarray(ours), peak=255)


def diffusers_pipeline(model: Path, sampler: str, img2img: bool = False):
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    entry = lookup(sampler)
    scheduler_cls = getattr(diffusers, entry.diffusers_class)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **dict(entry.forced))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def two_steps_at_64(pipe: diffusers.DiffusionPipeline) -> np.ndarray:
    """A diffusers text-to-image pipeline's images (N, 64, 64, 3) float for one prompt, 2 steps, seed 0."""
    return pipe(
        "a lighthouse at dusk",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
