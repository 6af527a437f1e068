"""The `sd-engine` command line.

Library code raises :class:`engine.errors.EngineError` for user mistakes; this module turns those
into one line on stderr and a non-zero exit. Heavy imports (torch, diffusers) happen inside the
commands that need them, so `sd-engine --help` and the runtime commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from PIL import Image

from engine import __version__
from engine.bench.cli import add_bench_command
from engine.build_trt import add_build_command
from engine.errors import EngineError
from engine.logs import quiet_libraries

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
DEFAULT_SIZE = (512, 512)
DEFAULT_ENGINE_SIZE = (64, 64)  # the built-in tiny engine: small images, fast
BACKENDS = ("onnxruntime", "torch", "torch-cuda", "tensorrt", "openvino")
CPU_BACKENDS = ("torch", "openvino")
SWITCH = {"auto": None, "on": True, "off": False}
BAR_WIDTH = 30
RANDOM_SEED_LIMIT = 2**31  # random seeds stay far from the 2**32 - 1 limit, whatever the batch

log = logging.getLogger("sd-engine")


def _err(message: str) -> None:
    print(f"sd-engine: error: {message}", file=sys.stderr)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_init_random(args: argparse.Namespace) -> int:
    from engine.presets import init_random

    quiet_libraries()
    start = time.perf_counter()
    out = init_random(args.preset, args.out_dir, seed=args.seed, overwrite=args.overwrite)
    _say(f"wrote {args.preset} (seed {args.seed}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import ExportSettings, export_model
    from engine.specs import Network, Precision

    quiet_libraries()
    networks = tuple(Network(n) for n in args.networks) if args.networks else tuple(Network)
    settings = ExportSettings(
        precision=Precision.FP16 if args.fp16 else Precision.FP32,
        networks=networks,
        overwrite=args.overwrite,
    )
    start = time.perf_counter()
    result = export_model(args.model_dir, args.engine_dir, settings, progress=_say)
    elapsed = time.perf_counter() - start
    _say(f"exported {len(result.manifest.graphs)} graphs to {result.engine_dir} in {elapsed:.1f} s")
    for network, entry in result.manifest.graphs.items():
        _say(f"  {network.value:13s} {entry.precision.value}  {parity_line(entry.parity)}")
        if entry.onnxruntime is not None:
            variant = entry.onnxruntime
            _say(f"    {variant.file} ({variant.rewrite})  {parity_line(variant.parity)}")
    return 0


def parity_line(parity: Mapping[str, Any]) -> str:
    return (
        f"rel L2 {parity['worst_rel_l2']:.2e}  max abs {parity['worst_max_abs']:.2e}  "
        f"min PSNR {parity['min_psnr_db']:.1f} dB"
    )


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height); argparse turns the error into its usage message."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected WxH such as 512x512, got {text!r}")
    return int(match.group(1)), int(match.group(2))


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
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise EngineError(f"init image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise EngineError(f"cannot read init image {path}: {error}") from None


def check_output(output: Path) -> None:
    """Refuse a bad output path before spending minutes on generation."""
    if output.suffix.lower() != ".png":
        raise EngineError(f"output must be a .png file, got {output}")
    if not output.parent.is_dir():
        raise EngineError(f"output folder does not exist: {output.parent}")
    if output.is_dir():
        raise EngineError(f"output path is a folder: {output}")


def resolve_engine(engine_dir: Path | None) -> tuple[Path, bool]:
    """The engine folder to use and whether it is the built-in default (built on first use)."""
    if engine_dir is not None:
        return engine_dir, False
    from engine.default_engine import check_build_dependencies, default_engine_ready, ensure_default_engine

    if not default_engine_ready():
        check_build_dependencies()
        quiet_libraries()
    return ensure_default_engine(progress=_say), True


def generation_settings(args: argparse.Namespace, is_default: bool, image: Any) -> dict[str, Any]:
    width, height = args.size or (DEFAULT_ENGINE_SIZE if is_default else DEFAULT_SIZE)
    seed = secrets.randbelow(RANDOM_SEED_LIMIT) if args.seed is None else args.seed
    return {
        "negative_prompt": args.negative,
        "steps": args.steps,
        "guidance_scale": args.cfg,
        "width": width,
        "height": height,
        "sampler": args.sampler,
        "seed": seed,
        "batch_size": args.batch,
        "image": image,
        "strength": args.strength,
        "clip_skip": args.clip_skip,
    }


def save_images(result: Any, output: Path) -> list[Path]:
    """One PNG per image, each with its own seed and batch position in the infotext."""
    from engine.infotext import format_infotext, save_png

    paths = output_paths(output, len(result.images))
    for pos, (image, seed, path) in enumerate(zip(result.images, result.seeds, paths, strict=True)):
        params = {**result.parameters, "seed": seed, "batch_pos": pos}
        try:
            save_png(image, path, format_infotext(params))
        except OSError as error:
            raise EngineError(f"cannot write {path}: {error.strerror or error}") from None
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.pipeline import Pipeline

    check_output(args.output)
    image = open_init_image(args.init_image) if args.init_image is not None else None
    engine_dir, is_default = resolve_engine(args.engine_dir)
    start = time.perf_counter()
    pipe = Pipeline.load(
        engine_dir, backend=args.backend, fused_cfg=SWITCH[args.fused_cfg], **backend_options(args)
    )
    log.info("loaded %s (%s) in %.1f s", engine_dir, args.backend, time.perf_counter() - start)
    bar = ProgressBar(sys.stderr)
    try:
        result = pipe.generate(args.prompt, callback=bar, **generation_settings(args, is_default, image))
    except ValueError as error:
        raise EngineError(str(error)) from None
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
    wanted = SWITCH[args.cuda_graph]
    if wanted is None:
        return {}
    if args.backend in CPU_BACKENDS:
        raise EngineError(f"--cuda-graph: the {args.backend} backend runs on the CPU; use a GPU backend")
    return {"cuda_graph": wanted}


def cmd_samplers(args: argparse.Namespace) -> int:
    from engine.schedulers import names

    for name in names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-engine", description="Stable Diffusion inference engine")
    parser.add_argument("--version", action="version", version=f"sd-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_init_random(commands)
    _add_export(commands)
    _add_generate(commands)
    _add_samplers(commands)
    add_build_command(commands)
    add_bench_command(commands)
    return parser


def _add_init_random(commands: argparse._SubParsersAction) -> None:
    from engine.presets import Preset

    cmd = commands.add_parser("init-random", help="write a diffusers folder with random weights")
    cmd.add_argument(
        "preset", choices=[p.value for p in Preset], metavar="PRESET", help="tiny, tiny-v, sd15, sd21"
    )
    cmd.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    cmd.add_argument("--seed", type=int, default=0, help="same seed, same weights (default 0)")
    cmd.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    cmd.set_defaults(run=cmd_init_random)


def _add_export(commands: argparse._SubParsersAction) -> None:
    from engine.specs import Network

    cmd = commands.add_parser("export", help="diffusers folder -> parity-gated ONNX engine folder")
    cmd.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    cmd.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR")
    cmd.add_argument(
        "--fp16", action="store_true", help="fp16 text encoder and UNet (for GPUs); VAE stays fp32"
    )
    cmd.add_argument(
        "--networks", nargs="+", choices=[n.value for n in Network], help="export only these (default: all)"
    )
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing ENGINE_DIR")
    cmd.set_defaults(run=cmd_export)


def _add_generate(commands: argparse._SubParsersAction) -> None:
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
    cmd.add_argument("--sampler", default="Euler a", help="see `sd-engine samplers` (default: Euler a)")
    cmd.add_argument("--seed", type=int, help="image i gets seed + i (default: random, reported)")
    cmd.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    cmd.add_argument("--init-image", type=Path, metavar="IMG", help="img2img: start from this image")
    cmd.add_argument("--strength", type=float, default=0.8, help="img2img denoising strength (default 0.8)")
    cmd.add_argument("--clip-skip", type=int, default=1, help="1 or 2 (default 1)")
    cmd.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="(default onnxruntime)")
    cmd.add_argument(
        "--fused-cfg",
        choices=list(SWITCH),
        default="auto",
        help="guidance inside the unet_cfg graph (auto: when the engine folder has it)",
    )
    cmd.add_argument(
        "--cuda-graph",
        choices=list(SWITCH),
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


def _add_samplers(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("samplers", help="list the sampler names --sampler accepts")
    cmd.set_defaults(run=cmd_samplers)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except EngineError as error:
        _err(str(error))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
