"""Pixels in and out: image files, bytes or PIL images -> the RGB a viewer shows; uint8 RGB arrays <-> the
VAE's float32 NCHW tensors in [-1, 1].

:func:`load_image` is the one way an init image enters the engine (the CLI's ``--init-image``, a
request's PIL image, a JSON request's base64 image). It reads an image as a viewer shows it:

* **EXIF orientation** is applied (a phone photo stored sideways with Orientation 6 comes out upright),
  as diffusers' ``load_image`` and A1111 do.
* **Transparency** (modes ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``; a palette's alpha or a transparent
  index, grey or colour key from PNG/GIF) is flattened over white (:data:`BACKGROUND`), as A1111's img2img
  does with its default background colour and a viewer does on a white page. diffusers' ``load_image``
  instead drops the alpha channel (``convert("RGB")``), showing whatever colour fully transparent pixels
  happen to store; for opaque images the two agree exactly.
* **16-bit and float pixels are scaled, not clipped**: 16-bit grey (Pillow modes ``I;16*``, and ``I``,
  which Pillow uses for 16-bit PGM/PPM and older 16-bit PNGs) maps 0..65535 to 0..255
  (``round(v / 257)``); float grey (mode ``F``) maps 0..1 to 0..255. Pillow's own ``convert`` clips both
  at 255 (a 16-bit photo becomes nearly all white). Values outside those ranges, or NaN / inf, are
  refused rather than guessed.
* Every other mode Pillow decodes (``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``,
  ``HSV``) is converted by Pillow; anything else is refused in one line.

An image that cannot be read (missing, a folder, empty, not an image, truncated or corrupt, too large,
an unsupported mode) raises :class:`engine.errors.RequestError`: one line on the CLI, a 4xx for a
service. The pixel limit is a per-call argument (:data:`MAX_IMAGE_PIXELS` by default), checked against
the size in the file's header before any pixel is decoded; this module never changes Pillow's global
``Image.MAX_IMAGE_PIXELS``. Pillow's own decompression-bomb check (twice that global, 178,956,970
pixels by default) still applies, so a ``max_pixels`` above it is capped there.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import RequestError

if TYPE_CHECKING:
    from PIL import Image

# 2**26 = 67,108,864 pixels (8192 x 8192): a 48-61 MP camera or phone photo passes, a 100 MP one does not.
# Decoded as RGB that is 192 MiB; the largest image the engine makes is 4096 x 4096, a quarter of it.
MAX_IMAGE_PIXELS = 2**26

BACKGROUND = (255, 255, 255)  # what transparent pixels become: white, A1111's default img2img background

# Formats Pillow can identify but that are never decoded here, and why.
REFUSED_FORMATS: Mapping[str, str] = {"EPS": "Pillow runs Ghostscript, an external program, to decode it"}

ImageSource = str | Path | bytes | bytearray | memoryview
MODES_PILLOW_CONVERTS = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
MODES_WITH_ALPHA = frozenset({"LA", "PA", "RGBA", "RGBa"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(
    source: ImageSource | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS, *, label: str = "image"
) -> Image.Image:
    """An image file (path), its bytes, or a PIL image -> a new RGB PIL image as a viewer shows it.

    EXIF orientation applied, transparency over white, 16-bit and float pixels scaled (see the module
    notes). ``max_pixels``: width x height above this is refused before decoding. ``label`` names the
    image in errors (the CLI says "init image"). Raises RequestError, one line, for anything unreadable.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return _decode(source, max_pixels, label)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise RequestError(f"cannot read {label}: no data (0 bytes)")
        return _open(io.BytesIO(data), max_pixels, f"{label} ({len(data):,} bytes)")
    if isinstance(source, str | Path):
        path = Path(source)
        _check_file(path, label)
        return _open(path, max_pixels, f"{label} {path}")
    raise RequestError(
        f"{label} must be an image file's path or bytes, or a PIL image, got {type(source).__name__}"
    )


def _check_file(path: Path, label: str) -> None:
    """A missing path, a folder, anything else that is not a file, or an empty file, in their own words."""
    try:
        exists, is_file = path.exists(), path.is_file()
        size = path.stat().st_size if is_file else 0
    except OSError as error:  # a name too long, a permission
        raise RequestError(f"cannot read {label} {path}: {error.strerror or error}") from None
    if not exists:
        raise RequestError(f"{label} not found: {path}")
    if not is_file:
        kind = "a folder, not an image file" if path.is_dir() else "not a regular file"
        raise RequestError(f"{label} is {kind}: {path}")
    if size == 0:
        raise RequestError(f"cannot read {label} {path}: the file is empty")


def _open(file: Path | io.BytesIO, max_pixels: int, what: str) -> Image.Image:
    """Open (the header only), check, then decode a file or an in-memory one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours (checked next) is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(file)
    except UnidentifiedImageError:
        raise RequestError(f"cannot read {what}: not an image file Pillow can read") from None
    except Exception as error:  # see _unreadable
        raise _unreadable(what, error, max_pixels) from None
    with opened:
        return _decode(opened, max_pixels, what)


def _decode(image: Image.Image, max_pixels: int, what: str) -> Image.Image:
    """Size and format checks on the header, then the pixels, upright, as RGB."""
    from PIL import ImageOps

    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            f"cannot read {what}: {width}x{height} is {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} pixels; downscale it"
        )
    if width == 0 or height == 0:
        raise RequestError(f"cannot read {what}: it has no pixels ({width}x{height})")
    if image.format in REFUSED_FORMATS:
        raise RequestError(
            f"cannot read {what}: {image.format} images are refused ({REFUSED_FORMATS[image.format]})"
        )
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except Exception as error:  # see _unreadable
        raise _unreadable(what, error, max_pixels) from None
    return to_rgb(upright, what)


def _unreadable(what: str, error: Exception, max_pixels: int) -> RequestError:
    """The one-line error for a failure inside Pillow's open or decode. Pillow's decoders raise OSError,
    SyntaxError, ValueError, RuntimeError, struct.error, zlib.error ... on damaged data, so the callers
    catch every Exception, around Pillow's calls only."""
    from PIL import Image

    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, Image.DecompressionBombError):  # Pillow's own hard limit, above ours
        claimed = re.search(r"\((\d+) pixels\)", reason)
        size = f"its header claims {int(claimed.group(1)):,} pixels" if claimed else "it is too large"
        return RequestError(
            f"cannot read {what}: {size}, over the limit of {max_pixels:,} pixels; downscale it"
        )
    if isinstance(error, OSError) and error.errno is not None:  # the file system, not the data
        return RequestError(f"cannot read {what}: {error.strerror or reason}")
    return RequestError(f"cannot read {what}: truncated or corrupt data ({reason})")


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """A decoded PIL image of any mode -> RGB as a viewer shows it (see the module notes).

    Raises RequestError naming ``what`` for a mode without an RGB mapping or float / 32-bit values
    outside the ranges above.
    """
    from PIL import Image

    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        grey = _scaled_grey(image, what)
        return _flatten_grey(grey, _transparent_mask(image)).convert("RGB")
    if mode == "La":  # premultiplied: over white, each value is v + (255 - alpha)
        values = np.asarray(image, dtype=np.int32)
        grey = np.clip(values[..., 0] + 255 - values[..., 1], 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in MODES_WITH_ALPHA or (mode in MODES_PILLOW_CONVERTS and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    if mode in MODES_PILLOW_CONVERTS:
        return image.convert("RGB")
    raise RequestError(f"cannot read {what}: Pillow mode {mode!r} has no RGB mapping here")


def _scaled_grey(image: Image.Image, what: str) -> np.ndarray:
    """16-bit (0..65535) or float (0..1) grey -> uint8 0..255, rounded; out-of-range values refused."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise RequestError(f"cannot read {what}: the float image (mode F) holds NaN or inf values")
        low, high, top, kind = 0.0, 1.0, 1.0, "float (mode F) images must hold 0..1"
    else:
        low, high, top, kind = 0, 65535, 65535, "16-bit images must hold 0..65535"
    lo, hi = (values.min(), values.max()) if values.size else (low, high)
    if lo < low or hi > high:
        raise RequestError(f"cannot read {what}: {kind}, this one holds {lo:g}..{hi:g}")
    return np.round(values.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _transparent_mask(image: Image.Image) -> np.ndarray | None:
    """Where a grey image's single transparent value (PNG tRNS) is, else None."""
    key = image.info.get("transparency")
    if not isinstance(key, int | float) or isinstance(key, bool):
        return None
    return np.asarray(image) == key


def _flatten_grey(grey: np.ndarray, transparent: np.ndarray | None) -> Image.Image:
    from PIL import Image

    if transparent is not None:
        grey = np.where(transparent, np.uint8(BACKGROUND[0]), grey)  # white background: equal channels
    return Image.fromarray(grey)  # 2-D uint8: mode L


def image_to_array(image: Any, width: int, height: int) -> np.ndarray:
    """HxWx3 uint8 RGB array (a request's image) or a PIL image (read by :func:`load_image`) -> (1, 3, H,
    W) float32 in [-1, 1], resized to width x height with Lanczos (diffusers' VaeImageProcessor default)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    else:
        image = load_image(image)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def to_pil(pixels: np.ndarray) -> list[Any]:
    """VAE output in [-1, 1] (N, 3, H, W) -> PIL images, rounded like diffusers' postprocess."""
    from PIL import Image

    array = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
