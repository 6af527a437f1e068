"""`sd-engine init-random PRESET OUT_DIR`: a diffusers folder with random weights."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engine.commands.common import say
from engine.logs import quiet_libraries


def cmd_init_random(args: argparse.Namespace) -> int:
    from engine.models.presets import init_random

    quiet_libraries()
    start = time.perf_counter()
    out = init_random(args.preset, args.out_dir, seed=args.seed, overwrite=args.overwrite)
    say(f"wrote {args.preset} (seed {args.seed}) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    from engine.models.presets import Preset

    cmd = commands.add_parser("init-random", help="write a diffusers folder with random weights")
    cmd.add_argument(
        "preset",
        choices=[p.value for p in Preset],
        metavar="PRESET",
        help=", ".join(p.value for p in Preset) + " (tiny*: built in a second; the others: real sizes)",
    )
    cmd.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    cmd.add_argument("--seed", type=int, default=0, help="same seed, same weights (default 0)")
    cmd.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    cmd.set_defaults(run=cmd_init_random)
