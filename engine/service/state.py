"""What the routes share: the config, served engines, queue, progress board, metrics and A1111
options of one app (no module-level state), and the bridge from an HTTP request to a finished job."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.adapters import AdapterError
from engine.errors import Cancelled, EngineError, RequestError
from engine.pipeline.request import SETTINGS, GenerationRequest
from engine.service.catalog import Catalog, EngineEntry, PipelinePool
from engine.service.config import ServeConfig
from engine.service.metrics import ServiceMetrics
from engine.service.progress import ProgressBoard
from engine.service.scheduler import Job, Rejected, Scheduler, split_request

if TYPE_CHECKING:
    from PIL import Image
    from starlette.requests import Request

    from engine.pipeline import GenerationResult

DISCONNECT_POLL_S = 0.25
DATA_URL_PREFIX = "base64,"
FIELD_NAMES = frozenset((*SETTINGS, "prompt", "negative_prompt"))  # what an engine message may start with


class ApiError(Exception):
    """A request the server answers with ``status`` and a one-line ``message`` naming ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        outcome: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.outcome = outcome  # for the metrics, when the status alone would mislabel it: (kind, reason)


def request_error(error: RequestError, status: int = 422, names: Mapping[str, str] | None = None) -> ApiError:
    """A RequestError's line as an ApiError naming the field: the name before ':' (``"scheduler: ..."``),
    else a leading setting name (``"steps must be ..."``, ``"clip_skip 3: ..."``), else none. ``names``
    maps the engine's setting names to the API's (``guidance_scale`` -> ``cfg_scale``), in the field and
    at the start of the message. A LoRA that cannot be used (an AdapterError) names the prompt, where
    its tag is."""
    text = str(error)
    if isinstance(error, AdapterError):
        return ApiError(status, text, "prompt")
    head = text.split(":", 1)[0] if ":" in text else ""
    first = re.split(r"[\s:]", text, maxsplit=1)[0]
    if head and head.replace("_", "").isalnum():
        param = head
    elif first in FIELD_NAMES:
        param = first
    else:
        return ApiError(status, text, None)
    renamed = (names or {}).get(param, param)
    if renamed != param and text.startswith(param):
        text = renamed + text[len(param) :]
    return ApiError(status, text, renamed)


@dataclass
class Options:
    """A1111's options a client can read and set (GET/POST /sdapi/v1/options), per app."""

    values: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.values)

    def update(self, changes: Mapping[str, Any]) -> None:
        with self.lock:
            self.values.update(changes)


class AppState:
    """Everything one server instance holds."""

    def __init__(self, config: ServeConfig, catalog: Catalog, pool: PipelinePool) -> None:
        self.config = config
        self.catalog = catalog
        self.pool = pool
        self.metrics = ServiceMetrics()
        self.board = ProgressBoard(config.preview_every)
        self.scheduler = Scheduler(
            pool,
            self.board,
            self.metrics,
            max_queue=config.max_queue,
            max_batch=config.max_batch,
            batch_window_ms=config.batch_window_ms,
        )
        default = catalog.entries[0]
        self.options = Options(
            {
                "sd_model_checkpoint": default.title,
                "sd_checkpoint_hash": default.sha256,
                "CLIP_stop_at_last_layers": 1,
                "show_progress_every_n_steps": config.preview_every,
                "live_previews_enable": config.preview_every > 0,
                "show_progress_type": "Approx cheap",
                "samples_format": "png",
                "eta_noise_seed_delta": 0,
                "sd_vae": "Automatic",
            }
        )
        self.loaded_default = threading.Event()
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.loaded_default.is_set() and self.load_error is None and not self.scheduler.draining

    def default_entry(self) -> EngineEntry:
        return self.catalog.find(self.options.snapshot()["sd_model_checkpoint"], "sd_model_checkpoint")

    def load_default(self) -> None:
        """Load the default engine (in a thread at start-up); /health/ready is 503 until it is done."""
        entry = self.catalog.entries[0]
        try:
            self.pool.acquire(entry)
            self.pool.release(entry)
        except EngineError as error:
            self.load_error = str(error)
        except Exception as error:  # a backend's own failure: reported the same way, in one line
            self.load_error = f"{type(error).__name__}: {error}"
        finally:
            self.loaded_default.set()

    def check_limits(self, request: GenerationRequest, images: int, entry: EngineEntry) -> None:
        """The server's limits, the model's size rule and readable prompts, before queueing: ApiError (4xx)
        naming the field."""
        limits = self.config.limits
        if request.steps > limits.steps:
            raise ApiError(
                422, f"steps must be at most {limits.steps} on this server, got {request.steps}", "steps"
            )
        for name in ("width", "height"):
            side = getattr(request, name)
            if side > limits.side:
                raise ApiError(422, f"{name} must be at most {limits.side} on this server, got {side}", name)
            if side % entry.vae_scale_factor:
                raise ApiError(
                    422, f"{name} must be a multiple of {entry.vae_scale_factor}, got {side}", name
                )
        if images > limits.images:
            several = images > request.num_images  # n_iter > 1
            name, what = ("n_iter", "batch_size x n_iter is ") if several else ("batch_size", "")
            raise ApiError(
                422, f"{name}: {what}{images} images; this server allows at most {limits.images}", name
            )
        check_text(request)

    async def run(
        self, http: Request, entry: EngineEntry, request: GenerationRequest, n_iter: int, kind: str
    ) -> list[GenerationResult]:
        """Queue the request's chunks as one job and wait for it: ApiError 429/503 when refused, 504 past the
        request timeout, 499 when the client went away (the job is dropped), 422/500 when it fails."""
        self.check_limits(request, request.num_images * n_iter, entry)
        chunks = split_request(request, n_iter, self.config.max_batch)
        job = Job(entry, chunks, kind, iterations=n_iter)
        try:
            self.scheduler.submit(job)
        except Rejected as error:
            headers = Scheduler.retry_after_headers(error.retry_after)
            raise ApiError(error.status, str(error), None, error.reason, headers) from None
        return await self._wait(http, job)

    async def _wait(self, http: Request, job: Job) -> list[GenerationResult]:
        future = asyncio.wrap_future(job.future)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_s
        while not future.done():
            await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if future.done():
                break
            if await http.is_disconnected():
                self.scheduler.cancel(job, "was dropped: its client disconnected")
                future.add_done_callback(_retrieve)
                raise ApiError(499, "client disconnected", None, "cancelled")
            if loop.time() > deadline:
                self.scheduler.cancel(job, "timed out")
                future.add_done_callback(_retrieve)
                raise ApiError(
                    504, f"the request took longer than {self.config.request_timeout_s:g} s", None, "timeout"
                )
        try:
            return future.result()
        except RequestError as error:
            raise request_error(error) from None
        except Cancelled as error:
            raise ApiError(503, str(error), None, "cancelled", outcome=("failed", "cancelled")) from None
        except EngineError as error:
            raise ApiError(500, str(error), None, "engine_error") from None


def _retrieve(future: asyncio.Future) -> None:
    """Read an abandoned job's outcome, so asyncio does not log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


def check_text(request: GenerationRequest) -> None:
    """Prompts must be valid Unicode (JSON's ``\\ud800`` escapes decode to lone surrogates the tokenizer
    rejects); checked before queueing so one bad prompt cannot fail the batch it would join."""
    for name, texts in (("prompt", request.prompts), ("negative_prompt", request.negative_prompts)):
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ApiError(
                    422,
                    f"{name} holds a character that is not valid Unicode ({text[error.start]!r} at "
                    f"{error.start}, a lone surrogate)",
                    name,
                ) from None


def decode_base64_image(text: Any, field_name: str, config: ServeConfig) -> Image.Image:
    """A base64 image (a ``data:image/...;base64,`` prefix stripped) as a viewer shows it; URLs are refused
    (the server fetches nothing). ApiError 422 naming the field for anything else."""

    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, f"{field_name} must be a base64-encoded image", field_name)
    text = text.strip()
    if text.startswith(("http://", "https://", "ftp://", "file:", "//")):
        raise ApiError(422, f"{field_name}: image URLs are not fetched; send the image as base64", field_name)
    if text.startswith("data:"):
        text = text.split(DATA_URL_PREFIX, 1)[1] if DATA_URL_PREFIX in text else ""
    limit = config.limits.image_bytes
    if len(text) > limit * 4 // 3 + 4:
        raise ApiError(
            413, f"{field_name} is larger than this server's {limit:,}-byte image limit", field_name
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field_name} is not valid base64", field_name) from None
    return open_image_bytes(data, field_name, config)


def open_image_bytes(data: bytes, field_name: str, config: ServeConfig) -> Image.Image:
    """An uploaded image file's bytes -> RGB PIL image; ApiError 413/422 naming the field."""
    from engine.pipeline.images import load_image

    if len(data) > config.limits.image_bytes:
        raise ApiError(
            413,
            f"{field_name} is larger than this server's {config.limits.image_bytes:,}-byte image limit",
            field_name,
        )
    try:
        return load_image(io.BytesIO(data).getvalue(), config.limits.image_pixels, label=field_name)
    except RequestError as error:
        raise ApiError(422, str(error), field_name) from None


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Base64 PNG, with A1111's ``parameters`` text chunk when given."""
    from engine.infotext import png_info

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(infotext) if infotext else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def flatten(results: Sequence[GenerationResult]) -> list[tuple[GenerationResult, int]]:
    """(result, index in it) for every image of a job, in seed order."""
    return [(result, i) for result in results for i in range(len(result.images))]
