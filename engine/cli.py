"""The `sd-engine` command line.

Library code raises :class:`engine.errors.EngineError` for user mistakes; this module turns those
into one line on stderr and a non-zero exit. Heavy imports (torch, diffusers) happen inside the
commands that need them, so `sd-engine --help` and the runtime commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from engine import __version__
from engine.commands import bench, build, export, generate, init_random, render, samplers, serve
from engine.commands.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, err
from engine.errors import EngineError

log = logging.getLogger("sd-engine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-engine", description="Stable Diffusion inference engine")
    parser.add_argument("--version", action="version", version=f"sd-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (init_random, export, generate, samplers, build, bench, serve, render):
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except EngineError as error:
        err(str(error))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        err("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
