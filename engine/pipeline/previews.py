"""Live previews of the sampling loop's latents, with no network: A1111's "Approx cheap".

Each pixel's RGB is a fixed linear map of its 4 latent channels: a (4, 3) matrix, then [-1, 1] to
0..255. One latent pixel makes one image pixel (64x64 latents -> a 64x64 preview of a 512x512 image);
the caller resizes if it wants. It costs one small matrix product: cheap enough for every step.

The SD 1.x/2.x factors are those A1111 uses in ``modules/sd_vae_approx.py`` (``cheap_approximation``),
fitted by Keturn for SD 1.4's VAE:
https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2. They apply to the
latents as the sampler holds them (VAE latents times the scaling factor, 0.18215 for SD 1.x).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from engine.errors import RequestError

# Rows: latent channels 0..3; columns: R, G, B. Output in [-1, 1] (roughly; clipped).
SD_LATENT_RGB = np.array(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ],
    dtype=np.float32,
)
SD_LATENT_RGB.flags.writeable = False


def latent_rgb(latents: np.ndarray) -> np.ndarray:
    """(B, 4, h, w) float latents -> (B, h, w, 3) uint8 RGB: the fixed linear map, then [-1, 1] to
    0..255 (rounded, as the engine's VAE output is; A1111 truncates, so values may differ by 1).
    Non-finite values come out as mid-grey / black / white (NaN, -inf, +inf). Raises RequestError
    for an array that is not (B, 4, h, w) with h, w >= 1."""
    _check(latents)
    rgb = np.asarray(latents, dtype=np.float32).transpose(0, 2, 3, 1) @ SD_LATENT_RGB
    rgb = np.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.rint(np.clip(rgb * 127.5 + 127.5, 0.0, 255.0)).astype(np.uint8)


def latent_preview(latents: np.ndarray) -> list[Any]:
    """(B, 4, h, w) float latents (unscaled, as in the sampling loop) -> B RGB PIL images of size
    (w, h). Raises RequestError for an array of another shape (see :func:`latent_rgb`)."""
    from PIL import Image

    return [Image.fromarray(pixels) for pixels in latent_rgb(latents)]


def preview_png_base64(latents: np.ndarray, index: int = 0) -> str:
    """Latent ``index``'s preview as a bare base64 PNG (A1111 ``/sdapi/v1/progress``'s
    ``current_image``). Raises RequestError for a bad shape or an index outside 0..B-1."""
    from PIL import Image

    _check(latents)
    count = latents.shape[0]
    if not (isinstance(index, int | np.integer) and not isinstance(index, bool) and 0 <= index < count):
        raise RequestError(f"preview index must be an integer in 0..{count - 1}, got {index!r}")
    pixels = latent_rgb(latents[index : index + 1])[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check(latents: Any) -> None:
    """RequestError unless ``latents`` is a real-valued (B, 4, h, w) array with h, w >= 1."""
    if not isinstance(latents, np.ndarray) or latents.dtype.kind not in "fiu":
        got = type(latents).__name__ if not isinstance(latents, np.ndarray) else f"dtype {latents.dtype}"
        raise RequestError(f"preview latents must be a (B, 4, h, w) float array, got {got}")
    shape = list(latents.shape)
    if latents.ndim != 4 or shape[1] != SD_LATENT_RGB.shape[0] or 0 in shape[2:]:
        raise RequestError(f"preview latents must be of shape (B, 4, h, w) with h, w >= 1, got {shape}")
