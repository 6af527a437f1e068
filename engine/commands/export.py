"""`sd-engine export MODEL ENGINE_DIR`: parity-gated ONNX graphs (``--torch-only``: none, for the torch
backends)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.commands.common import say
from engine.logs import quiet_libraries


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import ExportSettings, export_model
    from engine.models.source import SourceOptions
    from engine.specs import Network, Precision

    quiet_libraries()
    networks = tuple(Network(n) for n in args.networks) if args.networks else tuple(Network)
    settings = ExportSettings(
        precision=Precision.FP16 if args.fp16 else Precision.FP32,
        networks=networks,
        overwrite=args.overwrite,
        torch_only=args.torch_only,
    )
    start = time.perf_counter()
    options = SourceOptions(
        vae=args.vae, ema=args.ema, prediction_type=args.prediction_type, config_dir=args.config
    )
    result = export_model(args.model, args.engine_dir, settings, progress=say, options=options)
    elapsed = time.perf_counter() - start
    count = len(result.manifest.graphs)
    if settings.torch_only:
        say(
            f"wrote the manifest of {count} network{'s' if count != 1 else ''} and the tokenizer to "
            f"{result.engine_dir} in {elapsed:.1f} s, no ONNX graphs (--torch-only): run it with "
            "--backend torch or torch-cuda"
        )
        return 0
    say(f"exported {count} graph{'s' if count != 1 else ''} to {result.engine_dir} in {elapsed:.1f} s")
    for network, entry in result.manifest.graphs.items():
        say(f"  {network.value:13s} {entry.precision.value}  {parity_line(entry.parity)}")
        if entry.onnxruntime is not None:
            variant = entry.onnxruntime
            say(f"    {variant.file} ({variant.rewrite})  {parity_line(variant.parity)}")
    return 0


def parity_line(parity: Mapping[str, Any]) -> str:
    return (
        f"rel L2 {parity['worst_rel_l2']:.2e}  max abs {parity['worst_max_abs']:.2e}  "
        f"min PSNR {parity['min_psnr_db']:.1f} dB"
    )


def add_command(commands: argparse._SubParsersAction) -> None:
    from engine.models.source import PREDICTION_TYPES
    from engine.specs import Network

    cmd = commands.add_parser(
        "export",
        help="diffusers folder or single-file checkpoint -> parity-gated ONNX engine folder "
        "(--torch-only: no ONNX, for the torch backends)",
    )
    cmd.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="a diffusers folder, or an A1111/ComfyUI single-file checkpoint (.safetensors; .ckpt read "
        "without running code) of SD 1.x / 2.x",
    )
    cmd.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR")
    cmd.add_argument(
        "--fp16", action="store_true", help="fp16 text encoder and UNet (for GPUs); VAE stays fp32"
    )
    cmd.add_argument(
        "--networks", nargs="+", choices=[n.value for n in Network], help="export only these (default: all)"
    )
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing ENGINE_DIR")
    cmd.add_argument(
        "--torch-only",
        action="store_true",
        help="write no ONNX graphs, only the manifest and tokenizer (seconds, not minutes): the folder runs "
        "only with --backend torch or torch-cuda, which load MODEL itself (keep it where it is); "
        "onnxruntime, openvino and `sd-engine build` refuse it",
    )
    cmd.add_argument(
        "--vae",
        type=Path,
        metavar="PATH",
        help="use this VAE: a diffusers AutoencoderKL folder or a VAE file",
    )
    cmd.add_argument(
        "--ema", action="store_true", help="single file: use its EMA UNet weights (model_ema.*) instead"
    )
    cmd.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="override what the model says (single files: else a v_pred marker key, the .yaml beside the "
        "file, or a probe for SD 2)",
    )
    cmd.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="single file: a diffusers folder whose configs and tokenizer give the architecture "
        "(default: the SD 1.5 / SD 2.1 configs)",
    )
    cmd.set_defaults(run=cmd_export)
