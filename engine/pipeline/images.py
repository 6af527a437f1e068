"""Pixels in and out: PIL images or uint8 arrays <-> the VAE's float32 NCHW tensors in [-1, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np


def image_to_array(image: Any, width: int, height: int) -> np.ndarray:
    """PIL image or HxWx3 uint8 array -> (1, 3, H, W) float32 in [-1, 1], resized to width x height."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def to_pil(pixels: np.ndarray) -> list[Any]:
    """VAE output in [-1, 1] (N, 3, H, W) -> PIL images, rounded like diffusers' postprocess."""
    from PIL import Image

    array = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
