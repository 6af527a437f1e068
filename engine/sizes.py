"""The one ``WxH`` parser, shared by the CLI options and the benchmark configuration."""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?")


def parse_size(text: str, square_ok: bool = False) -> tuple[int, int]:
    """``"512x768"`` -> (512, 768), spaces and ``X`` allowed; with ``square_ok``, ``"256"`` -> (256, 256).

    Raises ValueError naming the text when it is not of that form; callers check the range.
    """
    match = _SIZE.fullmatch(str(text))
    if match is None or (match.group(2) is None and not square_ok):
        example = "N or WxH such as 512 or 512x768" if square_ok else "WxH such as 512x512"
        raise ValueError(f"expected {example}, got {text!r}")
    width = int(match.group(1))
    return width, int(match.group(2) or width)
