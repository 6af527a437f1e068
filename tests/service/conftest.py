"""A real server on 127.0.0.1 (uvicorn in a thread, a free port) over the tiny engine, for the clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn

from engine.service.config import Limits, ServeConfig
from engine.service.state import AppState

STARTUP_TIMEOUT_S = 60


@dataclass(frozen=True)
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    port: int
    state: AppState

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=120, **kwargs)


@contextmanager
def live_server(config: ServeConfig) -> Iterator[LiveServer]:
    """Serve ``config`` until the block ends; waits for /health/ready."""
    from engine.service.app import create_app

    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", port, app.state)
    while live.get("/health/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not become ready")
        time.sleep(0.05)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_config(engine: Path, **changes: Any) -> ServeConfig:
    """Small limits and a short batching window, as the tests want them."""
    base = ServeConfig(
        engines=(engine,),
        max_queue=8,
        max_batch=4,
        batch_window_ms=50.0,
        preview_every=1,
        limits=Limits(steps=100, side=512, images=16),
    )
    return replace(base, **changes)


@pytest.fixture(scope="session")
def server(tiny_engine: Path) -> Iterator[LiveServer]:
    """One shared server with the default test settings (no auth)."""
    with live_server(tiny_config(tiny_engine)) as live:
        yield live


@pytest.fixture
def make_server(tiny_engine: Path) -> Iterator[Callable[..., LiveServer]]:
    """A server with other settings (``tiny_config`` keywords), stopped after the test."""
    stack: list[Any] = []

    def make(**changes: Any) -> LiveServer:
        context = live_server(tiny_config(tiny_engine, **changes))
        stack.append(context)
        return context.__enter__()

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)
