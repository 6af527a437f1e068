"""The `sd-engine` command line.

Library code raises :class:`engine.errors.EngineError` for user mistakes; this module turns those
into one line on stderr and a non-zero exit. Heavy imports (torch, diffusers) happen inside the
commands that need them, so `sd-engine --help` and the runtime commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from engine import __version__
from engine.errors import EngineError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def _err(message: str) -> None:
    print(f"sd-engine: error: {message}", file=sys.stderr)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Keep library progress bars and advisories off the terminal; our own progress goes to stderr."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


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
        parity = entry.parity
        _say(
            f"  {network.value:13s} {entry.precision.value}  rel L2 {parity['worst_rel_l2']:.2e}  "
            f"max abs {parity['worst_max_abs']:.2e}  min PSNR {parity['min_psnr_db']:.1f} dB"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-engine", description="Stable Diffusion inference engine")
    parser.add_argument("--version", action="version", version=f"sd-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_init_random(commands)
    _add_export(commands)
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
