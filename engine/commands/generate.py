"""`sd-engine generate`: prompt -> PNG with A1111 infotext."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from PIL import Image

    from engine.pipeline.request import GenerationRequest
from engine.commands.common import parse_size, say
from engine.errors import EngineError
from engine.logs import quiet_libraries
from engine.runtime import BackendName, Switch, backend_names

DEFAULT_SIZE = (512, 512)


DEFAULT_ENGINE_SIZE = (64, 64)  # the built-in tiny engine: small images, fast


BACKENDS = tuple(backend_names())  # declared once, in engine.runtime


CPU_BACKENDS = tuple(name.value for name in BackendName if not name.runs_on_cuda)


BAR_WIDTH = 30


log = logging.getLogger("sd-engine")


def output_paths(output: Path, count: int) -> list[Path]:
    """out.png for the first image, then out-1.png, out-2.png, ... for the rest of a batch."""
    return [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def render_bar(step: int, total: int, width: int = BAR_WIDTH) -> str:
    done = width * step // total if total else width
    return f"[{'#' * done}{'.' * (width - done)}] {step}/{total} steps"


class ProgressBar:
    """A one-line step counter, redrawn in place on a terminal; silent when the stream is not one."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.drawn = False

    def __call__(self, info: Any) -> None:
        if self.enabled:
            self.stream.write("\r" + render_bar(info.step, info.total))
            self.stream.flush()
            self.drawn = True

    def close(self) -> None:
        """End the bar's line, so whatever is printed next starts on its own line."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def open_init_image(path: Path) -> Image.Image:
    """--init-image as a viewer shows it (EXIF orientation, transparency over white); anything unreadable
    (missing, a folder, empty, not an image, truncated, over MAX_IMAGE_PIXELS) is a one-line RequestError."""
    from engine.pipeline.images import load_image

    return load_image(path, label="init image")


def check_output(output: Path) -> None:
    """Refuse a bad output path before spending minutes on generation."""
    if output.suffix.lower() != ".png":
        raise EngineError(f"output must be a .png file, got {output}")
    if not output.parent.is_dir():
        raise EngineError(f"output folder does not exist: {output.parent}")
    if output.is_dir():
        raise EngineError(f"output path is a folder: {output}")


def resolve_engine(engine_dir: Path | None) -> Path:
    """The engine folder to use: the given one, else the built-in default (built on first use)."""
    if engine_dir is not None:
        return engine_dir
    from engine.commands.default_engine import (
        check_build_dependencies,
        default_engine_ready,
        ensure_default_engine,
    )

    if not default_engine_ready():
        check_build_dependencies()
        quiet_libraries()
    return ensure_default_engine(progress=say)


def build_request(args: argparse.Namespace, is_default: bool) -> GenerationRequest:
    """The request from the arguments, checked before any model loads (RequestError: one line)."""
    from engine.pipeline.request import GenerationRequest

    width, height = args.size or (DEFAULT_ENGINE_SIZE if is_default else DEFAULT_SIZE)
    image = open_init_image(args.init_image) if args.init_image is not None else None
    return GenerationRequest.create(
        args.prompt,
        args.negative,
        steps=args.steps,
        guidance_scale=args.cfg,
        width=width,
        height=height,
        sampler=args.sampler or GenerationRequest.sampler,
        seed=args.seed,
        batch_size=args.batch,
        image=image,
        strength=args.strength,
        clip_skip=args.clip_skip,
        loras=[parse_lora_arg(text) for text in args.lora or ()],
    )


def parse_lora_arg(text: str) -> tuple[str, float, float]:
    """``--lora FILE[:WEIGHT[:UNET_WEIGHT]]`` as (file or name, text-encoder weight, UNet weight); WEIGHT
    defaults to 1 for both. Trailing ``:number`` parts are weights, so paths may hold colons; a trailing
    part that is not a number is an EngineError naming it."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    name = ":".join(parts)
    if len(parts) > 1 and not Path(name).exists() and not numbers:
        raise EngineError(
            f"--lora {text}: {parts[-1]!r} is not a number (--lora FILE[:WEIGHT[:UNET_WEIGHT]])"
        )
    te = numbers[0] if numbers else 1.0
    return name, te, numbers[1] if len(numbers) > 1 else te


def save_images(result: Any, output: Path) -> list[Path]:
    """One PNG per image, each with its own seed and batch position in the infotext."""
    paths = output_paths(output, len(result.images))
    for index, path in enumerate(paths):
        try:
            result.save(index, path)
        except OSError as error:
            raise EngineError(f"cannot write {path}: {error.strerror or error}") from None
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.pipeline import Pipeline

    check_output(args.output)
    request = build_request(args, is_default=args.engine_dir is None)
    engine_dir = resolve_engine(args.engine_dir)
    if args.backend in (BackendName.TORCH.value, BackendName.TORCH_CUDA.value):
        with contextlib.suppress(ImportError):  # the backend then says what is missing, in one line
            quiet_libraries()  # it loads the source model through diffusers and transformers
    start = time.perf_counter()
    pipe = Pipeline.load(
        engine_dir,
        backend=args.backend,
        fused_cfg=args.fused_cfg,
        lora_dir=args.lora_dir,
        **backend_options(args),
    )
    log.info("loaded %s (%s) in %.1f s", engine_dir, args.backend, time.perf_counter() - start)
    if args.sampler is None:  # the model's own default (SDXL: its scheduler), see Pipeline.default_sampler
        request = dataclasses.replace(request, sampler=pipe.default_sampler)
    bar = ProgressBar(sys.stderr)
    try:
        result = pipe.run(request, on_step=bar)
    finally:
        bar.close()
    log.info("timings (ms): %s", ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()))
    paths = save_images(result, args.output)
    elapsed = time.perf_counter() - start
    for path, seed in zip(paths, result.seeds, strict=True):
        print(f"{path}  seed {seed}  {elapsed:.1f} s", flush=True)
    return 0


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """--cuda-graph for the backends that have CUDA graphs (auto: the backend's default)."""
    wanted = Switch(args.cuda_graph)
    if wanted is Switch.AUTO:
        return {}
    if not BackendName(args.backend).has_cuda_graphs:
        raise EngineError(f"--cuda-graph: the {args.backend} backend runs on the CPU; use a GPU backend")
    return {"cuda_graph": wanted}


def add_command(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "generate",
        help="prompt -> PNG (no ENGINE_DIR: the built-in tiny engine, built on first use)",
        description="Generate images. Without ENGINE_DIR, the tiny random-weight preset is built and "
        "exported on first use into $SD_ENGINE_HOME (default ~/.cache/sd-engine) and reused.",
    )
    cmd.add_argument(
        "engine_dir", type=Path, nargs="?", metavar="ENGINE_DIR", help="an exported engine folder"
    )
    cmd.add_argument("prompt", metavar="PROMPT")
    cmd.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    cmd.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    cmd.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    cmd.add_argument(
        "--size", type=parse_size, metavar="WxH", help="default 512x512; 64x64 for the built-in engine"
    )
    cmd.add_argument(
        "--sampler",
        default=None,
        help="see `sd-engine samplers` (default: Euler a; SDXL folders: their own scheduler, e.g. Euler)",
    )
    cmd.add_argument(
        "--seed", type=int, default=-1, help="image i gets seed + i (default -1: random, reported)"
    )
    cmd.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    cmd.add_argument("--init-image", type=Path, metavar="IMG", help="img2img: start from this image")
    cmd.add_argument("--strength", type=float, default=0.8, help="img2img denoising strength (default 0.8)")
    cmd.add_argument("--clip-skip", type=int, default=1, help="A1111's clip skip 1..12 (default 1)")
    cmd.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:WEIGHT]",
        help="apply a LoRA / LyCORIS .safetensors file (or a name in --lora-dir) at WEIGHT (default 1; "
        "FILE:TE:UNET for separate text-encoder and UNet weights); repeatable; prompts may also hold "
        "A1111 tags <lora:NAME:WEIGHT>",
    )
    cmd.add_argument(
        "--lora-dir", type=Path, metavar="DIR", help="where <lora:NAME> tags and --lora names find files"
    )
    cmd.add_argument(
        "--backend", choices=BACKENDS, default=BackendName.ONNXRUNTIME.value, help="(default onnxruntime)"
    )
    cmd.add_argument(
        "--fused-cfg",
        choices=[switch.value for switch in Switch],
        default="auto",
        help="guidance inside the unet_cfg graph (auto: when the engine folder has it)",
    )
    cmd.add_argument(
        "--cuda-graph",
        choices=[switch.value for switch in Switch],
        default="auto",
        help="replay the UNet as a CUDA graph (auto: on for torch-cuda and tensorrt, off for onnxruntime)",
    )
    cmd.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        metavar="OUT.png",
        help="default out.png; a batch writes OUT.png, OUT-1.png, OUT-2.png, ...",
    )
    cmd.set_defaults(run=cmd_generate)
