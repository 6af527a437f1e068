"""The OpenAI Images API: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models.

``model`` is a served engine's name (or title / hash); the names clients hard-code (``dall-e-2``,
``dall-e-3``, ``gpt-image-1`` and the like) mean the default engine. Only ``b64_json`` responses exist
(the server stores nothing to link to): ``response_format: "url"`` is a 400. ``quality``, ``style``,
``user`` and unknown fields are accepted and change nothing. Settings OpenAI lacks may come as extra
fields (the SDK's ``extra_body``): ``negative_prompt``, ``seed``, ``steps``, ``cfg_scale``, ``sampler``,
``strength`` (edits); each image's seed is returned beside it. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from engine.errors import RequestError
from engine.infotext import format_infotext
from engine.pipeline.request import GenerationRequest
from engine.schedulers import resolve as resolve_sampler
from engine.service.catalog import EngineEntry
from engine.service.schema import LenientModel
from engine.service.state import ApiError, AppState, encode_png, flatten, open_image_bytes, request_error

OPENAI_ALIASES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
DEFAULT_SIZE = "512x512"
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
DEFAULT_SAMPLER = "Euler a"
DEFAULT_EDIT_STRENGTH = 0.75
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


class ImagesRequest(LenientModel):
    """A generation (or, with its image, an edit). ``None`` means a field's default."""

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str = "auto"
    response_format: str = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    output_format: str | None = None
    stream: bool = False
    negative_prompt: str = ""
    seed: int = -1
    steps: int = Field(DEFAULT_STEPS, ge=1)
    cfg_scale: float = DEFAULT_CFG
    sampler: str = DEFAULT_SAMPLER
    strength: float = DEFAULT_EDIT_STRENGTH


def auto_size(image: Image.Image | None, max_side: int, factor: int = 8) -> tuple[int, int]:
    """``size: "auto"`` (gpt-image-1's default): an edit keeps its image's size (scaled to fit
    ``max_side``, rounded down to a multiple of ``factor``); a generation is 512x512."""
    if image is None:
        return parse_size(DEFAULT_SIZE)
    scale = min(1.0, max_side / max(image.size))
    return tuple(max(factor, int(side * scale) // factor * factor) for side in image.size)  # type: ignore[return-value]


def parse_size(size: str) -> tuple[int, int]:
    match = _SIZE.match(size)
    if match is None:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '512x512', got {size!r}", "size")
    return int(match.group(1)), int(match.group(2))


def find_model(state: AppState, name: str | None) -> EngineEntry:
    if not name or name.lower() in OPENAI_ALIASES:
        return state.default_entry()
    try:
        return state.catalog.find(name, "model")
    except RequestError as error:
        raise ApiError(404, str(error), "model", "model_not_found") from None


def to_request(body: ImagesRequest, image: Image.Image | None, max_side: int) -> GenerationRequest:
    if body.response_format != "b64_json":
        raise ApiError(
            400,
            f"response_format {body.response_format!r} is not supported: this server "
            "returns images inline only; use 'b64_json'",
            "response_format",
        )
    if body.stream:
        raise ApiError(
            400,
            "stream: streamed (partial) images are not supported by this server; "
            "send the request without stream",
            "stream",
        )
    if body.background not in (None, "auto", "opaque"):
        raise ApiError(
            400,
            f"background {body.background!r} is not supported: images are opaque; use 'auto' or 'opaque'",
            "background",
        )
    if body.output_format not in (None, "png"):
        raise ApiError(
            400, f"output_format {body.output_format!r} is not supported; use 'png'", "output_format"
        )
    auto = body.size.strip().lower() == "auto"
    width, height = auto_size(image, max_side) if auto else parse_size(body.size)
    try:
        sampler = resolve_sampler(body.sampler)
    except ValueError as error:
        raise ApiError(400, f"sampler: {error}", "sampler") from None
    settings: dict[str, Any] = {
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": width,
        "height": height,
        "sampler": sampler,
        "seed": body.seed,
        "batch_size": body.n,
    }
    if image is not None:
        settings.update(image=image, strength=body.strength)
    try:
        return GenerationRequest.create(body.prompt, body.negative_prompt, **settings)
    except RequestError as error:
        api_error = request_error(error, status=400, names={"guidance_scale": "cfg_scale"})
        if api_error.param in ("width", "height"):
            api_error.param = "size"
        elif api_error.param == "batch_size":
            api_error.param = "n"
        raise api_error from None


def respond(results: list[Any]) -> dict[str, Any]:
    data = []
    for result, i in flatten(results):
        text = format_infotext({**result.parameters, "seed": result.seeds[i]})
        data.append(
            {"b64_json": encode_png(result.images[i], text), "revised_prompt": None, "seed": result.seeds[i]}
        )
    return {"created": int(time.time()), "data": data}


async def generate(state: AppState, http: Request, body: ImagesRequest, image: Image.Image | None) -> Any:
    entry = find_model(state, body.model)
    request = to_request(body, image, state.config.limits.side)
    try:
        state.check_limits(request, request.num_images, entry)
    except ApiError as error:
        error.status = 400
        error.param = {"width": "size", "height": "size", "batch_size": "n"}.get(
            error.param or "", error.param
        )
        raise
    results = await state.run(http, entry, request, 1, "img2img" if image is not None else "txt2img")
    return await run_in_threadpool(respond, results)


async def read_edit_form(http: Request, state: AppState) -> tuple[ImagesRequest, Image.Image]:
    """The multipart fields of an edit: ``image`` or ``image[]`` (the SDK's name for lists; the first
    image is used), ``mask`` refused until inpainting exists, the rest as in a generation."""
    try:
        form = await http.form(max_files=16, max_fields=100, max_part_size=state.config.limits.body_bytes)
    except Exception as error:  # starlette raises its own for a malformed multipart body
        raise ApiError(
            400, f"the body must be multipart/form-data with an image and a prompt: {error}", "image"
        ) from None
    uploads = [v for key in ("image", "image[]") for v in form.getlist(key)]
    if form.get("mask") is not None:
        raise ApiError(400, "mask: inpainting is not supported by this server yet; send no mask", "mask")
    files = [u for u in uploads if isinstance(u, UploadFile)]
    if not files:
        raise ApiError(
            400, "image: an edit needs an image file (multipart field 'image' or 'image[]')", "image"
        )
    if len(files) > 1:
        raise ApiError(400, f"image: an edit takes one image on this server, got {len(files)}", "image")
    data = await files[0].read()
    image = await run_in_threadpool(open_image_bytes, data, "image", state.config)
    fields = {
        k: v for k, v in form.multi_items() if not isinstance(v, UploadFile) and k not in ("image", "image[]")
    }
    try:
        return ImagesRequest.model_validate(fields), image
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first.get("loc") else None
        raise ApiError(400, f"{param}: {first['msg']}", param) from None


def build_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/images/generations")
    async def generations(body: ImagesRequest, http: Request) -> Any:
        return await generate(state, http, body, None)

    @router.post("/images/edits")
    async def edits(http: Request) -> Any:
        body, image = await read_edit_form(http, state)
        return await generate(state, http, body, image)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": e.name, "object": "model", "created": 0, "owned_by": "sd-engine"}
            for e in state.catalog.entries
        ]
        return {"object": "list", "data": data}

    return router
