"""What every subcommand shares: exit codes, one-line messages, the WxH option type."""

from __future__ import annotations

import argparse
import sys

from engine import sizes

EXIT_USER_ERROR = 1


EXIT_INTERRUPTED = 130


def err(message: str) -> None:
    print(f"sd-engine: error: {message}", file=sys.stderr)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` or ``N`` (square) -> (width, height), as the bench reads sizes; argparse turns the error
    into its usage message."""
    try:
        return sizes.parse_size(text, square_ok=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
