"""A generation request: every setting of one generation, as a frozen value that round-trips through JSON.

The request checks everything that does not depend on the model once, when it is built (the CLI, the
bench and ``Pipeline.generate`` all build it with :meth:`GenerationRequest.create`); ``Pipeline.run``
then checks only what the model decides (:meth:`GenerationRequest.check_model`). Every failed check
raises :class:`engine.errors.RequestError`, one line naming the setting.
"""

from __future__ import annotations

import base64
import io
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

import numpy as np

from engine.errors import RequestError
from engine.pipeline.images import load_image
from engine.sampling.registry import resolve

MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
RANDOM_SEED = -1  # A1111: -1 (or None) asks for a random seed, chosen and recorded when the request is built

# Integer settings and their inclusive ranges; numbers as (low, high, low_inclusive).
MAX_LORA_MULTIPLIER = 10.0  # beyond it a LoRA's weights overflow into NaN images; A1111 users stay within 2
MAX_CLIP_SKIP = 12  # A1111's range: 1 (last layer) .. 12 (CLIP ViT-L's first layer)
_INTEGERS = {
    "steps": (1, 1000),
    "width": (1, MAX_SIDE),
    "height": (1, MAX_SIDE),
    "batch_size": (1, 64),
    "clip_skip": (1, MAX_CLIP_SKIP),
}
_NUMBERS = {
    "guidance_scale": (0.0, 100.0, True),
    "guidance_rescale": (0.0, 1.0, True),
    "strength": (0.0, 1.0, False),
}


@dataclass(frozen=True)
class StepInfo:
    """Progress after one UNet evaluation: ``step`` of ``total`` (1-based) at ``timestep``.

    ``latents``: the latents after that step, (images, channels, H/8, W/8) float32, for previews;
    the pipeline no longer uses that array, but it is shared with every callback: do not modify it.
    """

    step: int
    total: int
    timestep: float
    latents: np.ndarray | None = field(default=None, compare=False, repr=False)


class StepControl(str, Enum):
    """What a step callback asks of the sampling loop."""

    CONTINUE = "continue"
    STOP = "stop"  # end sampling now and decode the latents as they are (A1111's interrupt and skip)
    CANCEL = "cancel"  # abandon the generation: engine.errors.Cancelled is raised


# Return None / True to go on, False or StepControl.CANCEL to cancel, StepControl.STOP to stop early.
StepCallback = Callable[[StepInfo], "StepControl | bool | None"]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``prompts`` holds one entry per prompt; each makes ``batch_size`` images.

    ``seed`` None or -1: a random seed in 0..2**32-1, chosen here and recorded; image i gets seed + i.
    ``sampler`` is stored under its canonical name (``"euler  A"`` -> ``"Euler a"``).
    ``latents``: (images, channels, H/8, W/8) standard-normal noise, kept as a read-only float32 copy.
    ``image``: img2img's start, a PIL image (read as a viewer shows it: EXIF orientation applied,
    transparency over white, see :func:`engine.pipeline.images.load_image`) or an HxWx3 uint8 RGB array,
    kept as a read-only RGB uint8 copy. ``latents`` holding NaN or inf (also after the cast) are refused.
    ``loras``: LoRAs besides the prompt's ``<lora:...>`` tags, kept as (name or file path, text-encoder
    multiplier, UNet multiplier) triples; given as ``{"name": 0.8}``, ``{"name": (te, unet)}`` or a list of
    such pairs / triples (see :func:`lora_triples`). Equality compares the arrays by content.
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int = 20
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    clip_skip: int = 1
    width: int = 512
    height: int = 512
    sampler: str = "Euler a"
    seed: int = RANDOM_SEED
    batch_size: int = 1
    latents: np.ndarray | None = field(default=None, compare=False, repr=False)
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float = 0.8
    loras: tuple[tuple[str, float, float], ...] = ()

    def __post_init__(self) -> None:
        _check_prompts(self.prompts, self.negative_prompts)
        for name, (low, high) in _INTEGERS.items():
            _check_integer(name, getattr(self, name), low, high)
        for name, (low, high, closed) in _NUMBERS.items():
            _check_number(name, getattr(self, name), low, high, closed)
        set_field = object.__setattr__
        set_field(self, "sampler", _sampler(self.sampler))
        set_field(self, "seed", _seed(self.seed, len(self.prompts) * int(self.batch_size)))
        set_field(self, "prompts", tuple(self.prompts))
        set_field(self, "negative_prompts", tuple(self.negative_prompts))
        set_field(self, "loras", lora_triples(self.loras))
        _check_tags(prompt_networks(self.prompts))  # a malformed tag is refused here, never in a worker
        for name in _INTEGERS:
            set_field(self, name, int(getattr(self, name)))
        if self.latents is not None:
            set_field(self, "latents", _latents_array(self.latents))
        if self.image is not None:
            set_field(self, "image", _image_array(self.image))
            kept = int(self.steps * self.strength)  # img2img runs the last int(steps * strength) steps
            _require(kept >= 1, "strength", f"at least 1/{self.steps} to keep a step", self.strength)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GenerationRequest):
            return NotImplemented
        return (
            self._scalars() == other._scalars()
            and _same_array(self.latents, other.latents)
            and _same_array(self.image, other.image)
        )

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = "", **settings: Any
    ) -> GenerationRequest:
        """The one builder: ``prompt`` and ``negative_prompt`` are a string or a list (one negative is
        used for every prompt); ``settings`` are the other fields. Raises RequestError."""
        unknown = [name for name in settings if name not in SETTINGS]
        if unknown:
            raise RequestError(f"unknown setting {unknown[0]!r}; valid settings: {', '.join(SETTINGS)}")
        prompts = _prompt_tuple(prompt, "prompt")
        negatives = _prompt_tuple("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        return cls(prompts, negatives, **settings)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GenerationRequest:
        """A request from :meth:`to_json`'s dict (or one written by hand: only ``prompt`` is required)."""
        if not isinstance(data, Mapping) or "prompt" not in data:
            raise RequestError("a JSON request must be an object with a 'prompt'")
        settings = {k: v for k, v in data.items() if k not in ("prompt", "negative_prompt")}
        if settings.get("image") is not None:
            settings["image"] = _decode_png(settings["image"])
        if settings.get("latents") is not None:
            settings["latents"] = _decode_array(settings["latents"])
        return cls.create(data["prompt"], data.get("negative_prompt", ""), **settings)

    def to_json(self) -> dict[str, Any]:
        """JSON types only: prompts as lists, the image as base64 PNG, latents as shape + base64 float32."""
        return {
            "prompt": list(self.prompts),
            "negative_prompt": list(self.negative_prompts),
            **{name: value for name, value in zip(SCALAR_SETTINGS, self._scalars(), strict=True)},
            "latents": None if self.latents is None else _encode_array(self.latents),
            "image": None if self.image is None else _encode_png(self.image),
        }

    def _scalars(self) -> tuple[Any, ...]:
        """The scalar settings (everything but prompts and arrays), in SCALAR_SETTINGS order."""
        return tuple(getattr(self, name) for name in SCALAR_SETTINGS)

    # -- derived --------------------------------------------------------------------------------

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

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys can share one UNet batch (:meth:`merge`); None: this one runs alone
        (img2img, or initial latents given)."""
        if self.is_img2img or self.latents is not None:
            return None
        names = ("width", "height", "steps", "sampler", "guidance_scale", "guidance_rescale", "clip_skip")
        return (
            *(getattr(self, name) for name in names),
            self.loras,
            frozenset(prompt_networks(self.prompts)),
        )

    @staticmethod
    def merge(requests: Sequence[GenerationRequest]) -> GenerationRequest:
        """One request whose images are the images of ``requests`` in order (one prompt entry per
        image, batch_size 1). Its seed is meaningless: the caller seeds each image's generator itself
        (see Pipeline.run_batch). Raises RequestError unless every request has the same batch_key."""
        keys = {request.batch_key for request in requests}
        if not requests or None in keys or len(keys) != 1:
            raise RequestError(
                "only txt2img requests with the same size, steps, sampler, guidance, clip skip "
                "and LoRAs can share a batch"
            )
        prompts = [p for r in requests for p in r.prompts for _ in range(r.batch_size)]
        negatives = [n for r in requests for n in r.negative_prompts for _ in range(r.batch_size)]
        return replace(
            requests[0], prompts=tuple(prompts), negative_prompts=tuple(negatives), batch_size=1, seed=0
        )

    def check_model(self, vae_scale_factor: int, latent_channels: int, train_timesteps: int) -> None:
        """The checks that depend on the model: sizes, the latents' shape, steps. Raises RequestError."""
        for name in ("width", "height"):
            side = getattr(self, name)
            _require(side % vae_scale_factor == 0, name, f"a multiple of {vae_scale_factor}", side)
        _require(self.steps <= train_timesteps, "steps", f"at most the model's {train_timesteps}", self.steps)
        if self.latents is not None:
            expected = [self.num_images, latent_channels]
            expected += [self.height // vae_scale_factor, self.width // vae_scale_factor]
            shape = list(self.latents.shape)
            _require(shape == expected, "latents", f"of shape {expected}", f"shape {shape}", show=str)


_FIELDS = [f.name for f in fields(GenerationRequest)]
SETTINGS = tuple(name for name in _FIELDS if name not in ("prompts", "negative_prompts"))
SCALAR_SETTINGS = tuple(name for name in SETTINGS if name not in ("latents", "image"))


# -- checks -------------------------------------------------------------------------------------


def lora_triples(value: Any) -> tuple[tuple[str, float, float], ...]:
    """``loras`` as (name, te, unet) triples: a mapping name -> multiplier or (te, unet), or a sequence of
    (name, multiplier) / (name, te, unet). Multipliers are finite numbers (negative allowed, as in A1111).
    Raises RequestError naming what is wrong."""
    items = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise RequestError(f"loras must be a mapping of LoRA name to multiplier, got {_describe(value)}")
    triples = []
    for item in items:
        parts = tuple(item) if isinstance(item, tuple | list) else ()
        if len(parts) == 2 and isinstance(parts[1], tuple | list):
            parts = (parts[0], *parts[1])
        if len(parts) == 2:
            parts = (parts[0], parts[1], parts[1])
        ok = len(parts) == 3 and isinstance(parts[0], str) and bool(parts[0].strip())
        ok = ok and all(_finite_number(m) for m in parts[1:])
        if not ok:
            raise RequestError(
                f"loras entry {item!r} must be a LoRA name with a multiplier or (text encoder, UNet) "
                f"multipliers, numbers within -{MAX_LORA_MULTIPLIER:g}..{MAX_LORA_MULTIPLIER:g}"
            )
        triples.append((parts[0], float(parts[1]), float(parts[2])))
    return tuple(triples)


def _finite_number(value: Any) -> bool:
    """A LoRA multiplier: a number within +-MAX_LORA_MULTIPLIER (beyond it the weights overflow)."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
    return number and abs(value) <= MAX_LORA_MULTIPLIER


def _check_tags(networks: Sequence[Sequence[Any]]) -> None:
    """RequestError for a prompt tag's multiplier outside +-MAX_LORA_MULTIPLIER."""
    for tag in (tag for tags in networks for tag in tags):
        if not all(abs(m) <= MAX_LORA_MULTIPLIER for m in tag.multipliers):
            bound = f"{MAX_LORA_MULTIPLIER:g}"
            raise RequestError(f"{tag.text}: LoRA multipliers must be within -{bound}..{bound}")


def prompt_networks(prompts: Sequence[str]) -> tuple[Any, ...]:
    """The extra-network tags of each prompt (``<lora:name:0.8>``), for batching and LoRA selection."""
    from engine.text.prompt import extract_extra_networks

    return tuple(extract_extra_networks(prompt)[1] for prompt in prompts)


def _require(ok: bool, name: str, wanted: str, got: Any, show: Callable[[Any], str] = repr) -> None:
    if not ok:
        raise RequestError(f"{name} must be {wanted}, got {show(got)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_integer(name: str, value: Any, low: int, high: int) -> None:
    _require(_is_int(value) and low <= value <= high, name, f"an integer in {low}..{high}", value)


def _check_number(name: str, value: Any, low: float, high: float, closed: bool) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and (low <= value if closed else low < value) and value <= high
    _require(ok, name, f"a number in {'[' if closed else '('}{low:g}, {high:g}]", value)


def _prompt_tuple(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Sequence) else ()
    _require(
        bool(items) and all(isinstance(p, str) for p in items), name, "a string or a list of strings", value
    )
    return items


def _check_prompts(prompts: Sequence[str], negatives: Sequence[str]) -> None:
    for name, items in (("prompts", prompts), ("negative_prompts", negatives)):
        ok = isinstance(items, tuple | list) and bool(items) and all(isinstance(p, str) for p in items)
        _require(ok, name, "a non-empty list of strings", items)
    if len(negatives) != len(prompts):
        raise RequestError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")


def _sampler(name: Any) -> str:
    try:
        return resolve(name)
    except ValueError as error:
        raise RequestError(str(error)) from None


def _seed(seed: Any, count: int) -> int:
    """The first of ``count`` consecutive seeds (image i gets seed + i): every one of them must be a
    seed a request accepts, so a recorded seed always replays; -1 / None picks one at random."""
    top = MAX_SEED - count + 1
    if seed is None or (_is_int(seed) and seed == RANDOM_SEED):
        return secrets.randbelow(top + 1)
    _require(_is_int(seed) and 0 <= seed <= top, "seed", _seed_range(top, count), seed)
    return int(seed)


def _seed_range(top: int, count: int) -> str:
    span = f" (its {count} images take seed..seed+{count - 1})" if count > 1 else ""
    return f"-1 (random) or an integer in 0..{top}{span}"


def _latents_array(latents: Any) -> np.ndarray:
    ok = isinstance(latents, np.ndarray) and latents.ndim == 4 and np.issubdtype(latents.dtype, np.floating)
    _require(ok, "latents", "a 4-D float array", latents, show=_describe)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused next
        array = latents.astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():  # one NaN would make a black image, not an error
        nans = int(np.isnan(array).sum())
        infs = array.size - int(finite.sum()) - nans
        raise RequestError(f"latents must be finite, got {nans} NaN and {infs} inf values (as float32)")
    return _read_only(array)


def _image_array(image: Any) -> np.ndarray:
    """A PIL image as a viewer shows it (EXIF orientation, transparency over white: see
    engine.pipeline.images.load_image), or an HxWx3 uint8 RGB array taken as it is."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return _read_only(np.asarray(load_image(image, label="image"), dtype=np.uint8))
    ok = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    ok = ok and image.shape[0] > 0 and image.shape[1] > 0
    _require(ok, "image", "a PIL image or an HxWx3 uint8 array", image, show=_describe)
    return _read_only(image)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {list(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _read_only(array: np.ndarray) -> np.ndarray:
    """A private copy the caller cannot change behind the request's back."""
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# -- JSON encodings -----------------------------------------------------------------------------


def _encode_png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_png(text: Any) -> np.ndarray:
    """A base64 image file (PNG, JPEG, ...) -> HxWx3 uint8 RGB as a viewer shows it; RequestError, one
    line, when it is not base64 or not a readable image (too large, truncated, ...)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise RequestError("image must be a base64-encoded PNG, JPEG or other image file") from None
    return np.asarray(load_image(data, label="image"), dtype=np.uint8)


def _encode_array(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(data).decode("ascii")}


def _decode_array(value: Any) -> np.ndarray:
    try:
        shape = [int(n) for n in value["shape"]]
        if value.get("dtype", "float32") != "float32":
            raise ValueError(value["dtype"])
        flat = np.frombuffer(base64.b64decode(value["data"], validate=True), dtype="<f4")
        return flat.reshape(shape).astype(np.float32)
    except (TypeError, ValueError, KeyError, AttributeError):
        raise RequestError("latents must be {'shape': [...], 'dtype': 'float32', 'data': base64}") from None
