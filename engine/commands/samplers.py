"""`sd-engine samplers`: the sampler names --sampler accepts."""

from __future__ import annotations

import argparse


def cmd_samplers(args: argparse.Namespace) -> int:
    from engine.schedulers import names

    for name in names():
        print(name)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("samplers", help="list the sampler names --sampler accepts")
    cmd.set_defaults(run=cmd_samplers)
