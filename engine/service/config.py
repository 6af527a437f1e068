"""The server's settings: one frozen value built by the CLI (or by code that embeds the server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 7860  # A1111's
MIB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond any of them is a 4xx naming the field.

    body_bytes: the HTTP body (JSON or multipart), bytes. image_bytes / image_pixels: one decoded init
    image (file bytes after base64, width x height). steps, side (width and height, px), images
    (batch_size x n_iter, or OpenAI's n) per request.
    """

    body_bytes: int = 64 * MIB
    image_bytes: int = 32 * MIB
    image_pixels: int = 4096 * 4096
    steps: int = 150
    side: int = 2048
    images: int = 16


@dataclass(frozen=True)
class ServeConfig:
    """`sd-engine serve` settings.

    engines: engine folders; the first is the default. max_queue: requests waiting (not running) before
    new ones get 429. max_batch: images per UNet batch (dynamic batching and the split of large
    requests). batch_window_ms: how long the worker waits for compatible requests to join a batch.
    api_key: Bearer token; api_auth: A1111's ``user:pass`` pairs (HTTP Basic). drain_timeout_s: how long
    SIGTERM waits for accepted work. request_timeout_s: from the request reaching its route (body read) to
    the answer (504 beyond).
    memory_budget_bytes: loaded pipelines are evicted least recently used beyond it (their ONNX files'
    size counts). preview_every: steps between progress previews (0: none). cors_origins: none by default.
    lora_dir: where prompts' ``<lora:NAME>`` tags find LoRA files (listed by GET /sdapi/v1/loras).
    """

    engines: tuple[Path, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_queue: int = 64
    max_batch: int = 4
    batch_window_ms: float = 20.0
    api_key: str | None = field(default=None, repr=False)
    api_auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    drain_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    memory_budget_bytes: int | None = None
    preview_every: int = 5
    backend: str = "onnxruntime"
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    lora_dir: Path | None = None

    @property
    def needs_auth(self) -> bool:
        return bool(self.api_key) or bool(self.api_auth)
