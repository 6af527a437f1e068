"""`sd-engine build`: ONNX engine folder -> TensorRT plans."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.commands.common import parse_size
from engine.errors import BuildError, EngineError
from engine.manifest import read_manifest
from engine.specs import Network, Precision
from engine.tensorrt.builder import (
    DEFAULT_OPT_LEVEL,
    DEFAULT_WORKSPACE_GIB,
    GIB,
    BuildSettings,
    Rebuild,
    build_engine,
)
from engine.tensorrt.profiles import ProfileKind, ShapeProfile, default_sizes, make_profiles
from engine.text.chunks import MAX_CHUNKS

# Text lengths the UNet plans cover: 2 chunks by default (150 prompt tokens, A1111-TRT's default); the
# engine's prompt limit (engine.text.chunks.MAX_CHUNKS chunks of 77) at most.
DEFAULT_MAX_TOKENS = 2 * 77
MAX_TOKENS = MAX_CHUNKS * 77

# --vae choices: fp16 means an fp16 plan guarded by an fp32 one; fp16-guarded is its older spelling.
VAE_CHOICES = {"fp32": Precision.FP32, "fp16": Precision.FP16, "fp16-guarded": Precision.FP16}


def profiles_from_args(args: argparse.Namespace, model_family: str) -> tuple[ShapeProfile, ...]:
    """The shape profiles the options ask for. Without --size: the family's default sizes
    (:func:`engine.tensorrt.profiles.default_sizes`: 512x512; SDXL 1024x1024, dynamic 640..1536 px),
    --min-size / --max-size replacing the dynamic corners."""
    sizes, low, high = args.size, args.min_size, args.max_size
    if not sizes:
        defaults = default_sizes(model_family)
        sizes, low, high = [defaults.opt], low or defaults.low, high or defaults.high
    return make_profiles(ProfileKind(args.profile), args.batch, sizes, args.max_tokens, low, high)


def settings_from_args(args: argparse.Namespace, model_family: str) -> BuildSettings:
    """Typed settings from the parsed command line (argparse stays out of library code), for an engine
    folder of ``model_family`` (the manifest's: it picks the default sizes)."""
    profiles = profiles_from_args(args, model_family)
    if not 77 <= args.max_tokens <= MAX_TOKENS:
        raise BuildError(f"--max-tokens must be 77..{MAX_TOKENS} (multiples of 77), got {args.max_tokens}")
    if args.workspace <= 0:
        raise BuildError(f"--workspace must be positive, got {args.workspace}")
    return BuildSettings(
        profiles=profiles,
        networks=tuple(Network(n) for n in args.networks) if args.networks else None,
        vae_precision=VAE_CHOICES[args.vae],
        refit=args.refit,
        workspace_bytes=int(args.workspace * GIB),
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        rebuild=Rebuild.ALWAYS if args.force else Rebuild.NEVER if args.no_rebuild else Rebuild.AUTO,
    )


def cmd_build(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, read_manifest(args.engine_dir).model_family)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = build_engine(args.engine_dir, settings, progress=say, device=args.device)
    for result in results:
        parity = result.parity
        say(
            f"  {result.target.name:20s} {'built' if result.built else 'cached'} {result.seconds:7.1f} s  "
            f"rel L2 {parity.get('worst_rel_l2', float('nan')):.2e}  {result.path}"
        )
    return 0


def add_command(subparsers: Any) -> None:
    """Register ``build`` on the CLI's subparsers; its ``run`` returns the exit code."""
    cmd = subparsers.add_parser(
        "build",
        help="ONNX engine folder -> TensorRT fp16 plans (needs tensorrt and an NVIDIA GPU)",
        description="Build parity-gated TensorRT plans into ENGINE_DIR/tensorrt, reusing cached plans "
        "whose key (ONNX hash, precision, profiles, flags, TensorRT version, GPU) matches.",
    )
    cmd.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR")
    _add_profile_options(cmd)
    cmd.add_argument("--networks", nargs="+", choices=[n.value for n in Network], help="default: all")
    cmd.add_argument(
        "--vae",
        choices=list(VAE_CHOICES),
        default="fp32",
        help="fp32 (default) or fp16 with an fp32 fallback on overflow (fp16-guarded: the same); "
        "SDXL: fp32 only (its VAE overflows in fp16)",
    )
    cmd.add_argument(
        "--refit",
        action="store_true",
        help="refittable plans: LoRAs are applied by refitting weights, no rebuild",
    )
    cmd.add_argument("--timing-cache", type=Path, metavar="PATH", help="persistent timing cache file")
    cmd.add_argument(
        "--workspace",
        type=float,
        default=DEFAULT_WORKSPACE_GIB,
        metavar="GIB",
        help=f"builder workspace limit in GiB (default {DEFAULT_WORKSPACE_GIB:g})",
    )
    cmd.add_argument(
        "--opt-level",
        type=int,
        default=DEFAULT_OPT_LEVEL,
        choices=range(6),
        help="TensorRT builder optimization level 0-5 (default 3)",
    )
    cmd.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    rebuild = cmd.add_mutually_exclusive_group()
    rebuild.add_argument("--force", action="store_true", help="rebuild even when the cached plan matches")
    rebuild.add_argument("--no-rebuild", action="store_true", help="fail instead of rebuilding a stale plan")
    cmd.set_defaults(run=cmd_build)


def _add_profile_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--profile",
        choices=[k.value for k in ProfileKind],
        default="static",
        help="static: min = opt = max per batch and size (fastest); dynamic: one range",
    )
    cmd.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="images per request to cover (default 1); the first is the dynamic opt",
    )
    cmd.add_argument(
        "--size",
        type=parse_size,
        nargs="+",
        metavar="WxH",
        help="image sizes to cover (default: the model's native size, 512x512, SDXL 1024x1024); the "
        "first is the dynamic opt",
    )
    cmd.add_argument(
        "--min-size",
        type=parse_size,
        metavar="WxH",
        help="dynamic: smallest image (default: the smallest --size; without --size 512x512, SDXL 640x640)",
    )
    cmd.add_argument(
        "--max-size",
        type=parse_size,
        metavar="WxH",
        help="dynamic: largest image (default: the largest --size; without --size 512x512, SDXL 1536x1536)",
    )
    cmd.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"longest text the UNet sees, a multiple of 77 (a 75-token prompt chunk framed): default "
        f"{DEFAULT_MAX_TOKENS} (prompts up to 150 tokens, as A1111-TRT), at most {MAX_TOKENS} "
        "(8 chunks, the engine's prompt limit)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.build_trt ENGINE_DIR ...``: the build command without the full CLI."""
    parser = argparse.ArgumentParser(prog="sd-engine")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except EngineError as error:
        print(f"sd-engine: error: {error}", file=sys.stderr)
        return 1
