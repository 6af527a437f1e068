"""The ASGI app: routes, errors as JSON (A1111's shape under /sdapi, OpenAI's under /v1), and one
middleware for authentication, the body-size limit and the request metrics."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from engine.service import a1111, openai_images
from engine.service.catalog import Catalog, EngineEntry, PipelinePool
from engine.service.config import ServeConfig
from engine.service.state import ApiError, AppState

log = logging.getLogger("sd-engine.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
GENERATION_ROUTES = {
    "/sdapi/v1/txt2img": "a1111_txt2img",
    "/sdapi/v1/img2img": "a1111_img2img",
    "/v1/images/generations": "openai_generations",
    "/v1/images/edits": "openai_edits",
}
STATUS_OUTCOMES = {
    401: ("rejected", "unauthorized"),
    413: ("rejected", "too_large"),
    429: ("rejected", "queue_full"),
    503: ("rejected", "draining"),
    499: ("failed", "cancelled"),
    504: ("failed", "timeout"),
}
OUTCOME_KEY = "sd_engine.outcome"  # scope key: a list the error handler puts an accepted job's outcome in
CLIENT_CLOSED = 499  # nginx's code for a client that went away; never reaches the client


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(
    path: str, status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object under /v1, A1111's (FastAPI-style with a one-line detail) elsewhere."""
    if is_openai(path):
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 429:
            kind = "rate_limit_exceeded"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": code or _reason(status), "detail": message, "field": param}


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Error"


def json_error(
    path: str,
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a pydantic validation error as one line naming the field."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}", "body"
    field = ".".join(loc) or "body"
    got = first.get("input")
    shown = "" if got is None or isinstance(got, dict) else f", got {str(got)[:60]!r}"
    return f"{field}: {first.get('msg')}{shown}", (loc[0] if loc else "body")


class Gate:
    """Pure ASGI middleware: authentication (Bearer key or Basic user:pass, compared in constant time),
    the body-size limit, and the per-route request and generation-outcome counters."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.config = state.config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in GENERATION_ROUTES or self._known(path) else "other"
        arrived = time.monotonic()
        status_seen: list[int] = []
        outcome: list[tuple[str, str]] = []
        scope[OUTCOME_KEY] = outcome

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            status = status_seen[0] if status_seen else 500
            seconds = time.monotonic() - arrived
            self._count(
                route, scope.get("method", ""), status, path, seconds, outcome[0] if outcome else None
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        exempt = path in OPEN_PATHS or self._cors_preflight(scope)
        if self.config.needs_auth and not exempt and not self._authorized(scope):
            headers = {"WWW-Authenticate": 'Bearer, Basic realm="sd-engine"'}
            origin = _header(scope, b"origin")
            if origin is not None and origin in self.config.cors_origins:
                headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})  # a page reads why
            response = json_error(
                path,
                401,
                "authentication required: send the API key as 'Authorization: "
                "Bearer <key>' (or the --api-auth user:password as HTTP Basic)",
                None,
                "invalid_api_key",
                headers,
            )
            await response(scope, receive, send)
            return
        limit = self.config.limits.body_bytes
        message = f"the request body is larger than this server's {limit:,}-byte limit"
        too_large = json_error(path, 413, message, "body", "too_large")
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await too_large(scope, receive, send)
            return
        await self._limited(scope, receive, send, limit, too_large)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: Response
    ) -> None:
        """Run the app on a body (chunked: no Content-Length) that may not pass ``limit`` bytes. Once it
        does, whatever the app answers is replaced by the 413 (FastAPI turns any error while parsing a
        body into a 400, and the edits route reads its multipart form the same way)."""
        seen = 0
        answered = False

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"the request body is larger than this server's {limit:,}-byte limit")
            return message

        async def send_or_413(message: Message) -> None:
            nonlocal answered
            if seen <= limit:
                await send(message)
            elif not answered:
                answered = True
                await too_large(scope, receive, send)

        try:
            await self.app(scope, receive_limited, send_or_413)
        except BodyTooLarge:
            if not answered:
                await too_large(scope, receive, send)

    def _cors_preflight(self, scope: Scope) -> bool:
        """A browser's CORS preflight (it never carries credentials), when CORS is on: the CORS middleware
        answers it without reaching a route."""
        return (
            bool(self.config.cors_origins)
            and scope.get("method") == "OPTIONS"
            and _header(scope, b"origin") is not None
            and _header(scope, b"access-control-request-method") is not None
        )

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.config.api_key:
            return hmac.compare_digest(value.strip().encode(), self.config.api_key.encode())
        if scheme.lower() == "basic" and self.config.api_auth:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                return False
            matches = [
                hmac.compare_digest(f"{user}:{password}".encode(), f"{u}:{p}".encode())
                for u, p in self.config.api_auth
            ]
            return any(matches)
        return False

    def _known(self, path: str) -> bool:
        return path in OPEN_PATHS or path == "/metrics" or path.startswith(("/sdapi/v1/", "/v1/"))

    def _count(
        self, route: str, method: str, status: int, path: str, seconds: float, outcome: tuple[str, str] | None
    ) -> None:
        metrics = self.state.metrics
        metrics.http.labels(route, method, str(status)).inc()
        api = GENERATION_ROUTES.get(path)
        if api is None or method != "POST":
            return
        metrics.received.labels(api).inc()
        metrics.latency.labels(api).observe(seconds)
        if status == 200:
            metrics.succeeded.labels(api).inc()
            return
        fallback = ("failed", "error") if status >= 500 else ("rejected", "invalid")
        kind, reason = outcome or STATUS_OUTCOMES.get(status, fallback)
        (metrics.failed if kind == "failed" else metrics.rejected).labels(api, reason).inc()


class BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def create_app(config: ServeConfig, catalog: Catalog | None = None, pool: PipelinePool | None = None) -> Any:
    """The ASGI app for ``config``; ``pool`` defaults to Pipeline.load on the configured backend."""
    catalog = catalog or Catalog.open(config.engines)
    pool = pool or PipelinePool(_loader(config.backend, config.lora_dir), config.memory_budget_bytes)
    state = AppState(config, catalog, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load_default, name="load-default", daemon=True).start()
        yield
        state.scheduler.stop()

    app = FastAPI(title="sd-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sd = state
    _add_handlers(app)
    _add_basic_routes(app, state)
    app.include_router(a1111.build_router(state))
    app.include_router(openai_images.build_router(state))
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    return Gate(app, state)


def _loader(backend: str, lora_dir: Path | None = None) -> Callable[[EngineEntry], Any]:
    def load(entry: EngineEntry) -> Any:
        from engine.pipeline import Pipeline

        return Pipeline.load(entry.path, backend=backend, lora_dir=lora_dir)

    return load


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        path = request.url.path
        status = 400 if error.status == 422 and is_openai(path) else error.status  # OpenAI has no 422
        if error.outcome is not None and isinstance(request.scope.get(OUTCOME_KEY), list):
            request.scope[OUTCOME_KEY].append(error.outcome)
        return json_error(path, status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        message, param = validation_message(error)
        status = 400 if is_openai(request.url.path) else 422
        return json_error(request.url.path, status, message, param, "invalid_request")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, error: BodyTooLarge) -> Response:
        return json_error(request.url.path, 413, str(error), "body", "too_large")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        """FastAPI's own HTTPExceptions, e.g. a body it cannot decode (not UTF-8, nested too deep)."""
        cause = error.__cause__
        message = f"the body could not be parsed: {cause}" if cause is not None else str(error.detail)
        param = "body" if error.status_code in (400, 422) else None
        return json_error(
            request.url.path, error.status_code, message, param, "invalid_request", error.headers
        )

    @app.exception_handler(404)
    async def not_found(request: Request, error: Exception) -> Response:
        return json_error(
            request.url.path, 404, f"no route {request.method} {request.url.path}", None, "not_found"
        )

    @app.exception_handler(405)
    async def wrong_method(request: Request, error: Exception) -> Response:
        return json_error(
            request.url.path,
            405,
            f"{request.url.path} does not take {request.method}",
            None,
            "method_not_allowed",
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return json_error(
            request.url.path, 500, f"internal error: {type(error).__name__}", None, "server_error"
        )


def _add_basic_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready() -> Response:
        state.metrics.ready.set(1 if state.ready else 0)
        if state.ready:
            return JSONResponse({"status": "ready"})
        if state.load_error:
            reason = f"the default model failed to load: {state.load_error}"
        elif state.scheduler.draining:
            reason = "draining: the server is shutting down"
        else:
            reason = "loading the default model"
        return JSONResponse({"status": "unavailable", "detail": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.ready.set(1 if state.ready else 0)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
