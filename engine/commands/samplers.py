"""`sd-engine samplers`: the sampler names --sampler accepts."""

from __future__ import annotations

import argparse
import os
import sys


def cmd_samplers(args: argparse.Namespace) -> int:
    from engine.schedulers import names

    try:
        sys.stdout.write("".join(f"{name}\n" for name in names()))
        sys.stdout.flush()
    except BrokenPipeError:  # `sd-engine samplers | head`: the reader stopped early, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("samplers", help="list the sampler names --sampler accepts")
    cmd.set_defaults(run=cmd_samplers)
