"""`sd-engine render JOBS OUT_DIR --engine ENGINE_DIR`: batch offline rendering, resumable, on worker
processes or Ray."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.commands.common import EXIT_USER_ERROR, say
from engine.errors import EngineError
from engine.runtime import BackendName, backend_names

DEFAULT_WORKERS = 1
MAX_WORKERS = 64
DRY_RUN_ERRORS = 10  # bad rows a dry run prints


def cmd_render(args: argparse.Namespace) -> int:
    from engine.batch.render import RenderJob, render
    from engine.batch.runner import RenderSettings

    if not 1 <= args.workers <= MAX_WORKERS:
        raise EngineError(f"--workers must be in 1..{MAX_WORKERS}, got {args.workers}")
    if args.max_tries < 1:
        raise EngineError(f"--max-tries must be at least 1, got {args.max_tries}")
    if not args.jobs.is_file():
        raise EngineError(f"jobs file not found: {args.jobs}")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise EngineError(f"--lora-dir {args.lora_dir} is not a folder")
    settings = RenderSettings(
        engine_dir=args.engine,
        out_dir=args.out_dir,
        backend=args.backend,
        workers=args.workers,
        ray_address=args.ray,
        max_tries=args.max_tries,
        lora_dir=args.lora_dir,
    )
    job = RenderJob(args.jobs, settings, matrix(args), args.batch, args.fail_fast, not args.no_review)
    if args.ray is not None and not args.verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines
    if args.dry_run:
        return dry_run(job)
    with RichProgress() as progress:
        summary = render(job, progress)
    print(summary.line(), flush=True)
    if summary.planned:
        say(f"gallery: {args.out_dir / 'index.html'}")
    if not summary.ok:
        say(f"errors: {args.out_dir / 'errors.jsonl'}")
    return 0 if summary.ok else EXIT_USER_ERROR


def dry_run(job: Any) -> int:
    """Print what the render would do; exit 1 when it would report bad rows (or refuse, --fail-fast)."""
    from engine.batch.render import preview

    plan = preview(job)
    print(plan.line(), flush=True)
    for error in plan.bad_rows[:DRY_RUN_ERRORS]:
        say(f"line {error.line}: {error.error}")
    if len(plan.bad_rows) > DRY_RUN_ERRORS:
        say(f"... and {len(plan.bad_rows) - DRY_RUN_ERRORS} more bad rows")
    return EXIT_USER_ERROR if plan.bad_rows else 0


def matrix(args: argparse.Namespace) -> Any:
    """The X/Y/Z flags as a Matrix (one-line EngineError for a malformed list)."""
    from engine.batch.jobs import Matrix, parse_list, parse_seeds, parse_sizes

    def parsed(flag: str, text: str | None, parse: Callable[[str], tuple[Any, ...]]) -> tuple[Any, ...]:
        if text is None:
            return ()
        try:
            return parse(text)
        except ValueError as error:
            raise EngineError(f"{flag}: {error}") from None

    return Matrix(
        seeds=parsed("--seeds", args.seeds, parse_seeds),
        samplers=parsed("--samplers", args.samplers, lambda t: parse_list(t, str)),
        cfg=parsed("--cfg", args.cfg, lambda t: parse_list(t, float)),
        steps=parsed("--steps", args.steps, lambda t: parse_list(t, int)),
        sizes=parsed("--size", args.size, parse_sizes),
        negative_prompt=args.negative,
        images=args.images,
        clip_skip=args.clip_skip,
    )


class RichProgress:
    """A rich progress bar on stderr: images done / planned, images per minute, ETA, failures."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[failed]}"),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self.task: Any = None
        self.baseline: int | None = None  # images found done before this run (the driver's first call)
        self.rendered = self.failed = 0
        self.start = 0.0

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def __call__(self, total: int) -> Callable[[int, int], None]:
        """Start the bar (only once rendering starts: an error before it is one line, nothing more)."""
        self.progress.start()
        self.task = self.progress.add_task("render", total=total, rate="", failed="")
        return self.advance

    def advance(self, done: int, failed: int) -> None:
        if self.baseline is None:
            self.baseline, self.start = done, time.perf_counter()
        else:
            self.rendered += done
        self.failed += failed
        elapsed = time.perf_counter() - self.start
        rate = f"{60 * self.rendered / elapsed:.1f} img/min" if self.rendered and elapsed > 0 else ""
        self.progress.update(
            self.task,
            completed=self.baseline + self.rendered + self.failed,
            rate=rate,
            failed=f"{self.failed} failed" if self.failed else "",
        )


def add_command(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "render",
        help="batch rendering: a jobs file -> a folder of PNGs; resumable, on worker processes or Ray",
        description="Render every image a jobs file asks for into OUT_DIR (one PNG with A1111 infotext "
        "each, results.jsonl, errors.jsonl, contact sheets, index.html). Running the same command again "
        "resumes: finished images are skipped, an edited jobs file renders only what changed.",
    )
    cmd.add_argument(
        "jobs",
        type=Path,
        metavar="JOBS",
        help=".jsonl requests, .txt prompts, or .tsv/.csv with a Prompt column",
    )
    cmd.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    cmd.add_argument(
        "--engine", type=Path, required=True, metavar="ENGINE_DIR", help="an exported engine folder"
    )
    cmd.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="worker processes or Ray actors (default 1)"
    )
    cmd.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="on Ray: no ADDRESS starts or joins a local Ray; HOST:PORT joins a `ray start --head` cluster "
        "(put --ray after JOBS OUT_DIR, or write --ray=HOST:PORT)",
    )
    cmd.add_argument(
        "--batch", type=int, default=4, help="images per UNet batch (default 4; 1 turns batching off)"
    )
    cmd.add_argument(
        "--fail-fast",
        action="store_true",
        help="render nothing when a row is bad (all bad rows are listed); stop at the first failed image",
    )
    cmd.add_argument("--seeds", metavar="LIST", help="seeds as a matrix axis: 1-4,7 (-1: random, recorded)")
    cmd.add_argument("--samplers", metavar="LIST", help='samplers as an axis: "Euler a,DDIM"')
    cmd.add_argument("--cfg", metavar="LIST", help="guidance scales as an axis: 5,7.5")
    cmd.add_argument("--steps", metavar="LIST", help="steps (default 20), or an axis: 20,30")
    cmd.add_argument("--size", metavar="WxH[,WxH]", help="image size (default 512x512), or an axis")
    cmd.add_argument("--negative", metavar="TEXT", help="negative prompt for rows without one")
    cmd.add_argument("--images", type=int, metavar="N", help="images per seed for rows without n (default 1)")
    cmd.add_argument("--clip-skip", type=int, metavar="N", help="A1111's clip skip for rows without one")
    cmd.add_argument(
        "--backend",
        choices=tuple(backend_names()),
        default=BackendName.ONNXRUNTIME.value,
        help="(default onnxruntime)",
    )
    cmd.add_argument(
        "--max-tries", type=int, default=3, help="runs per image before a crashing one is given up"
    )
    cmd.add_argument(
        "--lora-dir", type=Path, metavar="DIR", help="LoRA files for <lora:NAME:WEIGHT> tags in prompts"
    )
    cmd.add_argument("--no-review", action="store_true", help="skip the contact sheets and index.html")
    cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and compare with OUT_DIR, write nothing: images to render, done, bad rows (exit 1 if any)",
    )
    cmd.set_defaults(run=cmd_render)
