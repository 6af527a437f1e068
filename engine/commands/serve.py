"""`sd-engine serve`: the A1111 and OpenAI Images APIs over engine folders (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.errors import EngineError, MissingDependencyError

API_KEY_VARIABLE = "SD_ENGINE_API_KEY"  # keeps the key out of `ps` listings
GIB = 2**30
MIB = 2**20


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {value}")
    return value


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $SD_ENGINE_API_KEY; an empty one is refused: it would serve without auth."""
    if args.api_key is not None:
        if not args.api_key.strip():
            raise EngineError("--api-key is empty (an unset variable?); give a key or leave the option out")
        return args.api_key
    value = os.environ.get(API_KEY_VARIABLE)
    if value is not None and not value.strip():
        raise EngineError(f"{API_KEY_VARIABLE} is set but empty; give it a key or unset it")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def credentials(text: str) -> tuple[tuple[str, str], ...]:
    """A1111's --api-auth: ``user:password`` pairs separated by commas."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise argparse.ArgumentTypeError("expected user:password[,user:password...]")
        pairs.append((user, password))
    return tuple(pairs)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"serve needs its extra ({error.name} is missing): pip install 'sd-engine[serve]'"
        ) from None
    from engine.service.config import Limits, ServeConfig
    from engine.service.server import serve

    for folder in args.engine_dirs:
        if not folder.is_dir():
            raise EngineError(f"engine folder {folder} does not exist")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise EngineError(f"--lora-dir {args.lora_dir} is not a folder")
    limits = Limits(
        body_bytes=int(args.max_body_mb * MIB),
        image_bytes=int(args.max_image_mb * MIB),
        image_pixels=args.max_image_pixels,
        steps=args.max_steps,
        side=args.max_side,
        images=args.max_images,
    )
    config = ServeConfig(
        engines=tuple(args.engine_dirs),
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms,
        api_key=api_key(args),
        api_auth=args.api_auth or (),
        drain_timeout_s=args.drain_timeout,
        request_timeout_s=args.request_timeout,
        memory_budget_bytes=int(args.memory_budget_gb * GIB) if args.memory_budget_gb else None,
        preview_every=args.preview_every,
        backend=args.backend,
        cors_origins=tuple(args.cors_origin or ()),
        limits=limits,
        lora_dir=args.lora_dir,
    )
    return serve(config)


def add_command(commands: argparse._SubParsersAction) -> None:
    from engine.runtime import backend_names

    cmd = commands.add_parser(
        "serve",
        help="serve the A1111 (/sdapi/v1) and OpenAI Images (/v1/images) APIs",
        description="Serve engine folders over HTTP: A1111's /sdapi/v1 routes, OpenAI's /v1/images routes, "
        "/health/live, /health/ready and /metrics. The first folder is the default model. SIGTERM or "
        "Ctrl-C drains: new work gets 503, accepted work finishes, then exit 0.",
    )
    cmd.add_argument(
        "engine_dirs",
        nargs="+",
        type=Path,
        metavar="ENGINE_DIR",
        help="engine folders from `sd-engine export`; the first is the default model",
    )
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    cmd.add_argument("--port", type=port_number, default=7860, help="port (default 7860, A1111's)")
    cmd.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 429 (64)")
    cmd.add_argument("--max-batch", type=positive_int, default=4, help="images per UNet batch (4)")
    cmd.add_argument(
        "--batch-window-ms",
        type=non_negative,
        default=20.0,
        help="how long a batch waits for compatible requests (20 ms; 0: no batching wait)",
    )
    cmd.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_VARIABLE})")
    cmd.add_argument("--api-auth", type=credentials, help="A1111's user:password[,user:password] (Basic)")
    cmd.add_argument(
        "--drain-timeout",
        type=non_negative,
        default=60.0,
        help="seconds SIGTERM waits for accepted work (60)",
    )
    cmd.add_argument(
        "--request-timeout",
        type=non_negative,
        default=600.0,
        help="seconds from arrival to answer before a 504 (600)",
    )
    cmd.add_argument(
        "--backend",
        default="onnxruntime",
        choices=backend_names(),
        help="what runs the networks (default onnxruntime)",
    )
    cmd.add_argument(
        "--memory-budget-gb",
        type=non_negative,
        default=0.0,
        help="unload least recently used models beyond this much weight (default 0: no limit)",
    )
    cmd.add_argument(
        "--preview-every",
        type=int,
        default=5,
        help="steps between /progress previews (A1111's show_progress_every_n_steps; default 5; 0: none)",
    )
    cmd.add_argument("--max-steps", type=positive_int, default=150, help="steps per request (150)")
    cmd.add_argument("--max-side", type=positive_int, default=2048, help="largest width or height (2048 px)")
    cmd.add_argument(
        "--max-images",
        type=positive_int,
        default=16,
        help="images per request: batch_size x n_iter, or n (16); batch_size itself is at most 64",
    )
    cmd.add_argument("--max-body-mb", type=non_negative, default=64.0, help="request body size (64 MiB)")
    cmd.add_argument(
        "--max-image-mb", type=non_negative, default=32.0, help="one decoded image file (32 MiB)"
    )
    cmd.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=4096 * 4096,
        help="width x height of one decoded image (16777216 = 4096x4096)",
    )
    cmd.add_argument("--cors-origin", action="append", help="allow this origin (CORS is off by default)")
    cmd.add_argument(
        "--lora-dir", type=Path, metavar="DIR", help="LoRA files for <lora:NAME:WEIGHT> tags in prompts"
    )
    cmd.set_defaults(run=cmd_serve)
