"""What every subcommand shares: exit codes, one-line messages, the WxH parser, on/off/auto switches."""

from __future__ import annotations

import argparse
import re
import sys

EXIT_USER_ERROR = 1


EXIT_INTERRUPTED = 130


SWITCH = {"auto": None, "on": True, "off": False}


def err(message: str) -> None:
    print(f"sd-engine: error: {message}", file=sys.stderr)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height); argparse turns the error into its usage message."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected WxH such as 512x512, got {text!r}")
    return int(match.group(1)), int(match.group(2))
