"""A1111's API under /sdapi/v1 as webuiapi 0.9.17 and A1111 clients call it.

Requests accept every A1111 field and ignore unknown ones, as A1111 does; ``null`` means a field's
default and numeric strings coerce. Fields whose feature this engine lacks (hires fix, face restore,
tiling, variation seeds, inpainting masks, styles, scripts) are accepted at their defaults and
refused with a 422 naming them otherwise, never silently dropped. Sampler tuning values that A1111
clients send on every call (eta, s_churn, s_tmin, s_tmax, s_noise, s_min_uncond) are accepted and do
not change the sampler, which follows diffusers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from engine.errors import RequestError
from engine.infotext import format_infotext, parse_infotext
from engine.pipeline.previews import preview_png_base64
from engine.pipeline.request import GenerationRequest
from engine.service.catalog import EngineEntry
from engine.service.samplers import resolve_sampler, samplers_listing, schedulers_listing
from engine.service.schema import LenientModel
from engine.service.state import (
    ApiError,
    AppState,
    decode_base64_image,
    encode_png,
    flatten,
    request_error,
)

A1111_VERSION = "v1.10.1"  # the A1111 API this server follows


class A1111Request(LenientModel):
    """The fields txt2img and img2img share. ``None`` for any field means its default."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to a feature this engine lacks: name -> value (empty when none)."""
        flags = {
            "restore_faces": self.restore_faces,
            "tiling": self.tiling,
            "subseed_strength": self.subseed_strength > 0,
            "styles": bool(self.styles),
            "script_name": bool(self.script_name),
            "refiner_checkpoint": bool(self.refiner_checkpoint) and self.refiner_checkpoint != "None",
            "infotext": bool(self.infotext),
        }
        return {name: getattr(self, name) for name, on in flags.items() if on}


class Txt2ImgRequest(A1111Request):
    enable_hr: bool = False
    denoising_strength: float | None = None  # hires fix only
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    def unsupported(self) -> dict[str, Any]:
        more = {"enable_hr": self.enable_hr} if self.enable_hr else {}
        return {**super().unsupported(), **more}


class Img2ImgRequest(A1111Request):
    init_images: list[Any] = Field(default_factory=list)
    resize_mode: int = Field(0, ge=0, le=3)
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False

    def unsupported(self) -> dict[str, Any]:
        more = {
            "mask": self.mask and "an inpainting mask",
            "latent_mask": self.latent_mask and "a latent mask",
            "resize_mode": self.resize_mode if self.resize_mode == 3 else None,
            "initial_noise_multiplier": self.initial_noise_multiplier
            if self.initial_noise_multiplier not in (None, 1, 1.0)
            else None,
        }
        return {**super().unsupported(), **{k: v for k, v in more.items() if v}}


# The engine's setting names as A1111 calls them, so an error names the field the client sent.
ENGINE_TO_A1111 = {
    "guidance_scale": "cfg_scale",
    "strength": "denoising_strength",
    "clip_skip": "CLIP_stop_at_last_layers",
    "sampler": "sampler_name",
}

SUPPORTED_SCRIPTS: tuple[str, ...] = ()  # /sdapi/v1/scripts lists exactly these


def check_supported(body: A1111Request) -> None:
    unsupported = body.unsupported()
    if unsupported:
        name, value = next(iter(unsupported.items()))
        raise ApiError(
            422, f"{name}: {value!r} is not supported by this server (sd-engine); leave it unset", name
        )
    for script in body.alwayson_scripts:
        if script.lower() not in {s.lower() for s in SUPPORTED_SCRIPTS}:
            raise ApiError(
                422,
                f"alwayson_scripts: this server has no script {script!r}; "
                "GET /sdapi/v1/scripts lists the ones it has",
                "alwayson_scripts",
            )


def engine_for(state: AppState, body: A1111Request) -> tuple[EngineEntry, int]:
    """The engine and clip skip a request uses: override_settings, else the server's options."""
    options = state.options.snapshot()
    overrides = {key: value for key, value in (body.override_settings or {}).items() if value is not None}
    name = overrides.get("sd_model_checkpoint") or options["sd_model_checkpoint"]
    try:
        entry = state.catalog.find(str(name), "override_settings.sd_model_checkpoint")
    except RequestError as error:
        raise ApiError(404, str(error), "sd_model_checkpoint", "model_not_found") from None
    check_overrides(overrides)
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"])
    return entry, clip_skip


# Options that change the images, with the only values this engine gives; others would be silently wrong.
FIXED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "eta_noise_seed_delta": (0, "0"),
    "sd_vae": ("Automatic", "None", ""),
    "samples_format": ("png", "PNG"),
}


def check_overrides(settings: dict[str, Any]) -> None:
    """ApiError 422 naming an option set to a value this engine cannot honour (see FIXED_OPTIONS)."""
    for name, allowed in FIXED_OPTIONS.items():
        if name in settings and settings[name] not in allowed:
            raise ApiError(
                422,
                f"{name}: {settings[name]!r} is not supported by this server; it gives {allowed[0]!r} only",
                name,
            )


def build_request(
    state: AppState,
    body: A1111Request,
    entry: EngineEntry,
    clip_skip: Any,
    image: Image.Image | None = None,
    strength: float | None = None,
) -> GenerationRequest:
    check_supported(body)
    try:
        sampler = resolve_sampler(body.sampler_name, body.sampler_index, body.scheduler)
        settings: dict[str, Any] = {
            "steps": body.steps,
            "guidance_scale": body.cfg_scale,
            "width": body.width,
            "height": body.height,
            "sampler": sampler,
            "seed": body.seed,
            "batch_size": body.batch_size,
            "clip_skip": int(clip_skip) if str(clip_skip).lstrip("-").isdigit() else clip_skip,
        }
        if image is not None:
            settings.update(image=image, strength=strength)
        return GenerationRequest.create(body.prompt, body.negative_prompt, **settings)
    except RequestError as error:
        raise request_error(error, names=ENGINE_TO_A1111) from None


def resize_init_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize modes (``modules/images.py`` ``resize_image`` with no upscaler), pixel for pixel:
    0 just resize (left to the pipeline, which stretches with Lanczos as A1111 does); 1 crop and resize
    (scaled with Lanczos to cover the frame, centred on black, the overflow cut); 2 resize and fill
    (scaled to fit, centred, the bands beside it filled by stretching its edge row or column). Sizes and
    offsets use A1111's integer arithmetic so that the same init image gives the same pixels."""
    if mode not in (1, 2):
        return image
    frame, source = width / height, image.width / image.height
    fit_width = frame > source if mode == 1 else frame < source
    if fit_width:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    scaled = image.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, (width // 2 - size[0] // 2, height // 2 - size[1] // 2))
    if mode == 2 and frame != source:
        _fill_bands(canvas, scaled, vertical=fit_width)
    return canvas


def _fill_bands(canvas: Image.Image, scaled: Image.Image, vertical: bool) -> None:
    """Resize-and-fill's bands: above and below ``scaled`` (``vertical``) or left and right of it, each
    its edge row or column stretched (Pillow's default bicubic over a zero-height or zero-width box,
    as A1111 calls it)."""
    width, height = canvas.size
    if vertical:
        band = height // 2 - scaled.height // 2
        if band > 0:
            top = scaled.resize((width, band), Image.Resampling.BICUBIC, box=(0, 0, width, 0))
            end = scaled.height
            bottom = scaled.resize((width, band), Image.Resampling.BICUBIC, box=(0, end, width, end))
            canvas.paste(top, (0, 0))
            canvas.paste(bottom, (0, band + scaled.height))
        return
    band = width // 2 - scaled.width // 2
    if band > 0:
        left = scaled.resize((band, height), Image.Resampling.BICUBIC, box=(0, 0, 0, height))
        end = scaled.width
        right = scaled.resize((band, height), Image.Resampling.BICUBIC, box=(end, 0, end, height))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (band + scaled.width, 0))


def info_json(
    state: AppState,
    body: A1111Request,
    request: GenerationRequest,
    entry: EngineEntry,
    images: list[tuple[Any, int]],
    infotexts: list[str],
) -> str:
    """A1111's ``info``: a JSON string of what made the images."""
    first = images[0][0] if images else None
    seeds = [result.seeds[i] for result, i in images]
    params = first.parameters if first else {}
    return json.dumps(
        {
            "prompt": body.prompt,
            "all_prompts": [body.prompt] * len(seeds),
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * len(seeds),
            "seed": request.seed,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0,
            "width": request.width,
            "height": request.height,
            "sampler_name": request.sampler,
            "cfg_scale": request.guidance_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": entry.model_name,
            "sd_model_hash": entry.short_hash,
            "sd_vae_name": params.get("vae_name"),
            "sd_vae_hash": params.get("vae_hash"),
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": request.strength if request.is_img2img else None,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": request.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": A1111_VERSION,
            "interrupted": any(result.stopped_early for result, _ in images),
        }
    )


def respond(
    state: AppState, body: A1111Request, request: GenerationRequest, entry: EngineEntry, results: list[Any]
) -> dict[str, Any]:
    images = flatten(results)
    infotexts = []
    for position, (result, i) in enumerate(images):
        params = {
            **result.parameters,
            "seed": result.seeds[i],
            "batch_size": request.batch_size,
            "batch_pos": position % request.batch_size,
        }
        infotexts.append(format_infotext(params))
    encoded = [
        encode_png(result.images[i], text) for (result, i), text in zip(images, infotexts, strict=True)
    ]
    return {
        "images": encoded if body.send_images else [],
        "parameters": body.model_dump(),
        "info": info_json(state, body, request, entry, images, infotexts),
    }


def build_router(state: AppState) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, http: Request) -> dict[str, Any]:
        entry, clip_skip = engine_for(state, body)
        request = build_request(state, body, entry, clip_skip)
        results = await state.run(http, entry, request, body.n_iter, "txt2img")
        return await run_in_threadpool(respond, state, body, request, entry, results)

    @router.post("/img2img")
    async def img2img(body: Img2ImgRequest, http: Request) -> dict[str, Any]:
        if len(body.init_images) != 1:
            raise ApiError(
                422,
                f"init_images must hold one base64 image on this server (A1111's cycling "
                f"through several is not supported), got {len(body.init_images)}",
                "init_images",
            )
        entry, clip_skip = engine_for(state, body)
        image = await run_in_threadpool(decode_base64_image, body.init_images[0], "init_images", state.config)
        image = resize_init_image(image, body.resize_mode, body.width, body.height)
        request = build_request(state, body, entry, clip_skip, image, body.denoising_strength)
        results = await state.run(http, entry, request, body.n_iter, "img2img")
        response = await run_in_threadpool(respond, state, body, request, entry, results)
        if body.include_init_images:
            response["images"] += [encode_png(image, None)]
        response["parameters"]["init_images"] = None  # not echoed: it can be megabytes
        return response

    @router.get("/progress")
    async def progress(skip_current_image: bool = Query(False)) -> dict[str, Any]:
        snap = state.board.read()
        image = None
        if not skip_current_image and snap.preview is not None:
            image = preview_png_base64(snap.preview)
        return {
            "progress": snap.progress,
            "eta_relative": snap.eta_relative(time.time()),
            "state": snap.state(),
            "current_image": image,
            "textinfo": None,
        }

    @router.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        return {"interrupted": state.scheduler.interrupt()}

    @router.post("/skip")
    async def skip() -> dict[str, Any]:
        return {"skipped": state.scheduler.skip()}

    @router.get("/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return samplers_listing()

    @router.get("/schedulers")
    async def schedulers_route() -> list[dict[str, Any]]:
        return schedulers_listing()

    @router.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [entry.a1111() for entry in state.catalog.entries]

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints() -> dict[str, Any]:
        return {}

    @router.get("/options")
    async def get_options() -> dict[str, Any]:
        return state.options.snapshot()

    @router.post("/options")
    async def set_options(changes: dict[str, Any]) -> dict[str, Any]:
        changes = dict(changes)
        check_overrides(changes)
        if "sd_model_checkpoint" in changes:
            try:
                entry = state.catalog.find(str(changes["sd_model_checkpoint"]), "sd_model_checkpoint")
            except RequestError as error:
                raise ApiError(404, str(error), "sd_model_checkpoint", "model_not_found") from None
            changes["sd_model_checkpoint"], changes["sd_checkpoint_hash"] = entry.title, entry.sha256
        if "CLIP_stop_at_last_layers" in changes:
            value = changes["CLIP_stop_at_last_layers"]
            try:
                changes["CLIP_stop_at_last_layers"] = GenerationRequest.create(
                    "", clip_skip=int(value)
                ).clip_skip
            except (TypeError, ValueError, OverflowError) as error:
                raise ApiError(
                    422,
                    f"CLIP_stop_at_last_layers must be an integer in 1..12, got {value!r}",
                    "CLIP_stop_at_last_layers",
                ) from error
        state.options.update(changes)
        return {}

    @router.post("/png-info")
    async def png_info(body: dict[str, Any]) -> dict[str, Any]:
        image = await run_in_threadpool(decode_base64_image, body.get("image"), "image", state.config)
        del image
        raw = _png_text(body.get("image"))
        text = raw.get("parameters", "")
        return {
            "info": text,
            "items": {k: v for k, v in raw.items() if k != "parameters"},
            "parameters": parse_infotext(text) if text else {},
        }

    @router.get("/scripts")
    async def scripts() -> dict[str, list[str]]:
        return {"txt2img": list(SUPPORTED_SCRIPTS), "img2img": list(SUPPORTED_SCRIPTS)}

    @router.get("/script-info")
    async def script_info() -> list[Any]:
        return []

    @router.get("/extensions")
    async def extensions() -> list[Any]:
        return []

    for path in (
        "/sd-vae",
        "/hypernetworks",
        "/face-restorers",
        "/realesrgan-models",
        "/prompt-styles",
        "/latent-upscale-modes",
        "/sd-modules",
    ):
        router.add_api_route(path, _empty_list, methods=["GET"])

    @router.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        """A1111's list: name (file stem), alias (ss_output_name, else the name), path, metadata."""
        return await run_in_threadpool(lora_list, state.config.lora_dir)

    @router.post("/refresh-loras")
    async def refresh_loras() -> None:
        return None  # files are looked up on every request: nothing to refresh

    @router.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]

    @router.get("/embeddings")
    async def embeddings() -> dict[str, Any]:
        return {"loaded": {}, "skipped": {}}

    @router.get("/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        return {"api": True, "listen": state.config.host != "127.0.0.1", "port": state.config.port}

    return router


def lora_list(lora_dir: Path | None) -> list[dict[str, Any]]:
    """GET /sdapi/v1/loras's entries for the LoRA files of ``lora_dir`` (none without one); blocking (it
    reads every file's header), so the route runs it in the thread pool. ApiError 503 when the folder is
    gone."""
    if lora_dir is None:
        return []
    from engine.adapters import AdapterError, list_loras

    try:
        infos = list_loras(lora_dir)
    except AdapterError as error:
        raise ApiError(503, str(error), None) from None
    return [
        {
            "name": info.name,
            "alias": info.alias or info.name,
            "path": str(info.path),
            "metadata": dict(info.metadata),
        }
        for info in infos
    ]


def _empty_list() -> list[Any]:
    return []


def _png_text(text: Any) -> dict[str, str]:
    """The text chunks of a base64 PNG (already checked readable)."""
    import base64
    import io

    data = text.split("base64,", 1)[1] if isinstance(text, str) and text.startswith("data:") else text
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
