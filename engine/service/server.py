"""Run the app on uvicorn with a clean drain.

The first SIGTERM or SIGINT starts the drain: /health/ready and new generation requests answer 503,
queued and running work finishes (up to ``drain_timeout_s``), answers are sent, then the server exits.
Work left at the drain timeout is cancelled (its clients get a 503). A second signal stops at once.
``serve`` returns 0 when everything accepted was answered, 1 when the drain timed out with work left.
"""

from __future__ import annotations

import logging
import socket
import threading
from types import FrameType
from typing import Any

import uvicorn

from engine.errors import EngineError
from engine.service.config import ServeConfig

log = logging.getLogger("sd-engine.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose exit signal drains the queue first (and is not re-raised afterwards,
    so the process exits 0 instead of dying by the signal)."""

    def __init__(self, config: uvicorn.Config, app_state: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app_state = app_state
        self.drain_timeout_s = drain_timeout_s
        self.work_left = False  # set when the exit cancelled accepted work: serve() then returns 1
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            log.warning("second signal: stopping now; the requests still queued or running get a 503")
            threading.Thread(target=self._stop_now, name="stop", daemon=True).start()
            return
        self._draining = True
        self.app_state.scheduler.start_drain()
        log.warning("draining: finishing accepted requests (up to %g s) before exit", self.drain_timeout_s)
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _stop_now(self) -> None:
        """Cancel the work left (the running batch at its next step) and exit once its clients have their
        503: no request is cut off mid-answer, and no network is running when the interpreter exits."""
        scheduler = self.app_state.scheduler
        self.work_left = self.work_left or scheduler.busy()
        scheduler.stop()
        self.should_exit = True

    def watch_start(self) -> None:
        """Exit (and let serve() report it) when the default model fails to load: a server that can
        never be ready should not sit behind a load balancer."""
        self.app_state.loaded_default.wait()
        if self.app_state.load_error:
            self.should_exit = True

    def _drain(self) -> None:
        scheduler = self.app_state.scheduler
        if not scheduler.wait_idle(self.drain_timeout_s):
            self.work_left = True
            log.error("drain timeout: cancelling %d requests still queued or running", scheduler.in_flight())
            scheduler.stop()  # their clients get a 503 now, within uvicorn's graceful shutdown
        self.should_exit = True


def check_address(host: str, port: int) -> None:
    """EngineError, one line, when ``host:port`` cannot be listened on (in use, not this machine's, ...),
    before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise EngineError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve(config: ServeConfig) -> int:
    """Serve until a signal; the exit status (0: every accepted request answered)."""
    from engine.service.app import create_app

    check_address(config.host, config.port)
    if not config.needs_auth and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without --api-key or --api-auth: anyone who reaches it can use it", config.host
        )
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(config.drain_timeout_s) + 1,
        lifespan="on",
    )
    server = DrainingServer(uv_config, app.state, config.drain_timeout_s)
    log.warning(
        "sd-engine serving %d model(s) on http://%s:%d", len(config.engines), config.host, config.port
    )
    threading.Thread(target=server.watch_start, name="watch-start", daemon=True).start()
    server.run()
    if app.state.load_error:
        raise EngineError(f"the default model failed to load: {app.state.load_error}")
    return 1 if server.work_left else 0
