"""A1111's prompt syntax: attention weights, BREAK, and extra-network tags (``<lora:name:0.8>``).

Written from the rules AUTOMATIC1111's web UI documents (its code is AGPL; none is copied here):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:w)``
  multiplies it by ``w``; nesting multiplies; a bracket still open at the end of the prompt still
  applies (``(unbalanced`` is weighted 1.1); an unmatched ``)`` or ``]`` is literal text.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; a backslash before any
  other character is dropped (``a\\b`` reads ``ab``), as in A1111.
- ``w`` is a number only as A1111's weight regex reads one: ``[+-]?`` then digits with at most one
  decimal point, spaces allowed around it (``( word : 1.2 )``). Anything else after a colon is
  literal text: ``text:1.4`` (no closing parenthesis), ``(word:1e3)``, ``(word:)``, ``(word:1.2.3)``
  all keep their colon and are weighted 1.1. (A1111's own regex accepts ``1.2.3`` or ``.`` and then
  fails converting it; here they are text.) A number too large for a float (400 digits) is text too,
  and a nested product that overflows saturates at +/-``sys.float_info.max`` so weights stay finite.
- ``BREAK`` (upper case, a whole word) ends a 75-token chunk; the parser marks it ``("BREAK", -1.0)``
  as A1111 does. Lower-case ``break`` is a word; a newline is whitespace, never a break.
- Adjacent fragments of equal weight are merged: ``(unnecessary)(parens)`` is
  ``[("unnecessaryparens", 1.1)]``; an empty prompt is ``[("", 1.0)]``.

BREAK inside brackets follows A1111's quirk rather than deviating: the marker is multiplied like any
fragment, which turns it into the literal word "BREAK" with weight -1.1 (``(a BREAK b)``) and no chunk
break. Prompts written for A1111 thus give the same chunks and embeddings here. One deviation, for
inputs nobody writes on purpose: A1111 tells a break from text only by ``("BREAK", -1)``, so a marker
multiplied back to exactly -1 (``((BREAK:-1):-1)``) is a break there and the word here; the public
``parse_prompt_attention`` output is identical for both.

Extra-network tags ``<kind:name[:number...]>`` are cut out of the prompt text before attention
parsing (A1111 removes them textually, so the text around them stays, spaces included).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass

from engine.errors import RequestError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WORD = "BREAK"
BREAK_WEIGHT = -1.0

# One alternative per token of the attention syntax, tried in this order.
_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)                               # \( \) \[ \] \\ (a lone \ is dropped)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)     # ":1.2)" closes a round bracket
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_MULTIPLIER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:name:m1:m2>`` tag: ``kind`` lower-cased, ``name`` and multipliers as typed."""

    kind: str  # "lora", "lyco", "hypernet", ...
    name: str
    multipliers: tuple[float, ...]  # () when the tag gives none; signs kept
    text: str  # the tag as typed, for messages


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and its weight; ``is_break`` marks a BREAK (text "BREAK", weight -1)."""

    text: str
    weight: float
    is_break: bool = False


def extract_extra_networks(prompt: str) -> tuple[str, tuple[ExtraNetwork, ...]]:
    """The prompt with every ``<kind:args>`` tag removed, and the tags in the order typed.

    ``kind`` is a word (any case, lower-cased here); args are split on ``:``: the name (dots, spaces,
    brackets allowed: anything but ``:`` and ``>``), then numbers. Tags of every kind are extracted so
    the caller can refuse the kinds it does not support. Raises RequestError, one line, for an
    argument after the name that is not a finite number (``<lora:x:abc>``, ``<lora:x:>``).
    """
    networks = tuple(parse_extra_network(match) for match in _EXTRA_NETWORK.finditer(prompt))
    return _EXTRA_NETWORK.sub("", prompt), networks


def parse_extra_network(match: re.Match[str]) -> ExtraNetwork:
    """One tag from its regex match (group 1: kind, group 2: "name:m1:m2")."""
    kind, (name, *numbers) = match.group(1), match.group(2).split(":")
    multipliers = []
    for number in numbers:
        value = float(number) if _MULTIPLIER.fullmatch(number) else math.nan
        if not math.isfinite(value):
            raise RequestError(
                f"extra-network tag {match.group(0)!r}: multiplier {number!r} is not a number "
                f"(write <{kind}:NAME>, <{kind}:NAME:0.8> or <{kind}:NAME:TE:UNET>)"
            )
        multipliers.append(value)
    return ExtraNetwork(kind.lower(), name, tuple(multipliers), match.group(0))


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's attention parse of ``text``: (fragment, weight) pairs, a BREAK as ("BREAK", -1.0).

    Never raises for any string. Extra-network tags are not removed here (see chunk_prompt).
    """
    return [(fragment.text, fragment.weight) for fragment in parse_fragments(text)]


def parse_fragments(text: str) -> list[Fragment]:
    """The attention parse as Fragments, so a real BREAK is told apart from the word at weight -1."""
    pieces: list[Fragment] = []
    round_open: list[int] = []  # index in pieces where each still-open bracket started
    square_open: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        number = float(match.group("weight")) if kind == "weight" else None
        if kind == "escape":
            pieces.append(Fragment(token[1:], 1.0))
        elif kind == "open":
            (round_open if token == "(" else square_open).append(len(pieces))
        elif number is not None and math.isfinite(number) and round_open:
            multiply_from(pieces, round_open.pop(), number)
        elif number is not None and not math.isfinite(number):  # too large for a float: text, then ")"
            pieces.extend(split_breaks(token[:-1]))
            close_bracket(pieces, ")", round_open, square_open)
        elif kind == "close":
            close_bracket(pieces, token, round_open, square_open)
        else:  # text, a lone colon, or ":1.2)" with no round bracket open
            pieces.extend(split_breaks(token))
    for start in round_open:
        multiply_from(pieces, start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(pieces, start, SQUARE_MULTIPLIER)
    return merge_equal_weights(pieces) or [Fragment("", 1.0)]


def close_bracket(pieces: list[Fragment], token: str, round_open: list[int], square_open: list[int]) -> None:
    """``)`` or ``]``: weight what its bracket opened, or literal text when none is open."""
    opened, multiplier = (round_open, ROUND_MULTIPLIER) if token == ")" else (square_open, SQUARE_MULTIPLIER)
    if opened:
        multiply_from(pieces, opened.pop(), multiplier)
    else:
        pieces.append(Fragment(token, 1.0))


def split_breaks(text: str) -> list[Fragment]:
    """Literal text at weight 1, a BREAK marker wherever the word BREAK stands (spaces around it dropped)."""
    fragments = []
    for index, part in enumerate(_BREAK.split(text)):
        if index:
            fragments.append(Fragment(BREAK_WORD, BREAK_WEIGHT, is_break=True))
        fragments.append(Fragment(part, 1.0))
    return fragments


def multiply_from(pieces: list[Fragment], start: int, multiplier: float) -> None:
    """Multiply the weights of pieces[start:] in place; a BREAK marker inside brackets becomes the
    word BREAK (A1111's quirk). A product beyond the float range saturates at +/-max."""
    for index in range(start, len(pieces)):
        piece = pieces[index]
        weight = piece.weight * multiplier
        if not math.isfinite(weight):
            weight = math.copysign(sys.float_info.max, weight)
        pieces[index] = Fragment(piece.text, weight)


def merge_equal_weights(pieces: list[Fragment]) -> list[Fragment]:
    """Join neighbours of exactly equal weight (BREAK markers are never joined)."""
    merged: list[Fragment] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last and not last.is_break and not piece.is_break and last.weight == piece.weight:
            merged[-1] = Fragment(last.text + piece.text, last.weight)
        else:
            merged.append(piece)
    return merged
