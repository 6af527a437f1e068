"""engine.text.prompt: A1111's attention syntax and extra-network tags, from the rules it documents.

Inputs that crash other parsers, and what ours gives (A1111's rules; where A1111 itself raises, the
decision is ours and says so). The tests below (CRASHERS, BREAKS) pin each row.

| input                    | result                                        | why                             |
|--------------------------|-----------------------------------------------|---------------------------------|
| ``text:1.4``             | ``[("text:1.4", 1.0)]``                       | a lone colon is text            |
| ``happy (camper:0.3)``   | ``[("happy ", 1.0), ("camper", 0.3)]``        | ``(text:w)`` sets the weight    |
| ``( digital Painting))`` | ``[(" digital Painting", 1.1), (")", 1.0)]``  | an unmatched ``)`` is text      |
| ``(word:1e3)``           | ``[("word:1e3", 1.1)]``                       | no exponent in A1111's regex:   |
|                          |                                               | text in a x1.1 group            |
| ``(word:)``              | ``[("word:", 1.1)]``                          | no number: colon is text        |
| ``(:1.2)``               | ``[("", 1.0)]``                               | weighs nothing; empty parse     |
| ``(word:1.2.3)``         | ``[("word:1.2.3", 1.1)]``                     | A1111 raises (float("1.2.3"));  |
|                          |                                               | ours: not a number, so text     |
| ``(word:.)``             | ``[("word:.", 1.1)]``                         | A1111 raises; ours: text        |
| ten nested ``(...)``     | ``[("word", 1.1 ** 10)]``                     | nesting multiplies              |
| ``(x:-1)``               | ``[("x", -1.0)]``                             | signed weights are allowed      |
| ``x:1.2) y``             | ``[("x:1.2) y", 1.0)]``                       | ``:w)`` with no ``(`` is text   |
| ``[a:1.2]``              | ``[("a:1.2", 1 / 1.1)]``                      | ``:w`` closes ``(`` only        |
| ``(w:`` 400 nines ``)``  | ``[("w:999...", 1.1)]``                       | beyond float range: text        |
|                          |                                               | (A1111 would weigh it inf)      |
| ``a\\b``                 | ``[("ab", 1.0)]``                             | a lone backslash is dropped,    |
|                          |                                               | as in A1111                     |
| ``(a BREAK b)``          | ``[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]`` | A1111's quirk: the marker is    |
|                          |                                               | weighted into the word BREAK    |
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import RequestError
from engine.text.prompt import ExtraNetwork, extract_extra_networks, parse_prompt_attention

Parsed = list[tuple[str, float]]

# A1111's documented examples (its parser's docstring), weights to 4 decimals.
DOCUMENTED = [
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a [less important] word", [("a ", 1.0), ("less important", 1 / 1.1), (" word", 1.0)]),
    ("(a:1.5)", [("a", 1.5)]),
]

# The table in the module docstring, plus neighbours.
CRASHERS = [
    ("text:1.4", [("text:1.4", 1.0)]),
    ("happy (camper:0.3)", [("happy ", 1.0), ("camper", 0.3)]),
    ("( digital Painting))", [(" digital Painting", 1.1), (")", 1.0)]),
    ("(word:1e3)", [("word:1e3", 1.1)]),
    ("(word:)", [("word:", 1.1)]),
    ("(:1.2)", [("", 1.0)]),
    ("(word:1.2.3)", [("word:1.2.3", 1.1)]),
    ("(word:.)", [("word:.", 1.1)]),
    ("(" * 10 + "word" + ")" * 10, [("word", 1.1**10)]),
    ("(" * 10 + "word", [("word", 1.1**10)]),
    ("word" + ")" * 10, [("word" + ")" * 10, 1.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("(x:+.5)", [("x", 0.5)]),
    ("(x:2.)", [("x", 2.0)]),
    ("( word : 1.5 )", [(" word ", 1.5)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    ("[a:1.2]", [("a:1.2", 1 / 1.1)]),
    ("(a:1.2]", [("a:1.2]", 1.1)]),
    ("(w:" + "9" * 400 + ")", [("w:" + "9" * 400, 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("((a:1.5))", [("a", 1.65)]),
    ("(a(b)c)", [("a", 1.1), ("b", 1.21), ("c", 1.1)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("[[a]", [("a", 1 / 1.21)]),
    ("]a[", [("]a", 1.0)]),
]

BREAKS = [
    ("BREAK a red cat", [("", 1.0), ("BREAK", -1.0), ("a red cat", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a red cat BREAK, a blue dog", [("a red cat", 1.0), ("BREAK", -1.0), (", a blue dog", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a\nb", [("a\nb", 1.0)]),
    ("BREAKS xBREAK BREAK_x", [("BREAKS xBREAK BREAK_x", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("[a BREAK b]", [("a", 1 / 1.1), ("BREAK", -1 / 1.1), ("b", 1 / 1.1)]),
    ("(x) BREAK (y)", [("x", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("y", 1.1)]),
]


def assert_parsed(actual: Parsed, expected: Parsed) -> None:
    """Texts exactly, weights to 4 decimals (as A1111's documentation prints them)."""
    assert [text for text, _ in actual] == [text for text, _ in expected]
    for (text, weight), (_, want) in zip(actual, expected, strict=True):
        assert weight == pytest.approx(want, abs=5e-5), text


@pytest.mark.parametrize(("prompt", "expected"), DOCUMENTED + CRASHERS + BREAKS)
def test_parse(prompt: str, expected: Parsed) -> None:
    assert_parsed(parse_prompt_attention(prompt), expected)


def test_documented_weights_are_exact_products() -> None:
    """Weights are the products of the multipliers, applied innermost first, as A1111 applies them."""
    parsed = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert parsed["house"] == 1.3 * 1.1 * 1.1
    assert parsed["sky"] == 1.1 * 1.1 * 1.1 * 1.1
    assert parsed["on"] == 1.1 * (1 / 1.1)


SYNTAX = "()[]:\\ .,0123456789-+eBREAKbreak\n<>lora"


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=SYNTAX, max_size=80)))
def test_fuzz_never_raises(prompt: str) -> None:
    parsed = parse_prompt_attention(prompt)
    assert parsed
    assert all(isinstance(text, str) and math.isfinite(weight) for text, weight in parsed)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]:\\"), max_size=60))
def test_fuzz_plain_text_is_one_fragment(prompt: str) -> None:
    """Text without syntax characters or BREAK is itself at weight 1 (so it tokenizes as diffusers does)."""
    parsed = parse_prompt_attention(prompt)
    if "BREAK" not in prompt:
        assert parsed == [(prompt, 1.0)]


def test_fuzz_saturates_overflowing_products() -> None:
    """Two huge but finite weights nested: the product saturates instead of becoming inf."""
    big = "9" * 300
    ((text, weight),) = parse_prompt_attention(f"((x:{big}):{big})")
    assert text == "x" and math.isfinite(weight) and weight > 1e307


# --- extra-network tags ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "text", "networks"),
    [
        (
            "a <lora:PAseer.GoldenWind-SD1.5-V1:0.7> cat",
            "a  cat",
            [("lora", "PAseer.GoldenWind-SD1.5-V1", (0.7,))],
        ),
        ("<lora:my lora file:1>x", "x", [("lora", "my lora file", (1.0,))]),
        ("<lora:[XL]Bloodborne:0.8>, knight", ", knight", [("lora", "[XL]Bloodborne", (0.8,))]),
        ("<lora:style__v2__final>", "", [("lora", "style__v2__final", ())]),
        ("<LORA:Name:0.5>", "", [("lora", "Name", (0.5,))]),
        ("<lora:n:-0.5:0.8>", "", [("lora", "n", (-0.5, 0.8))]),
        ("<lora:n: 1e-1 >", "", [("lora", "n", (0.1,))]),
        (
            "<lora:a:1> x <lyco:b:0.3> y <hypernet:c:1>",
            " x  y ",
            [("lora", "a", (1.0,)), ("lyco", "b", (0.3,)), ("hypernet", "c", (1.0,))],
        ),
        ("(<lora:x:0.5> cat:1.2)", "( cat:1.2)", [("lora", "x", (0.5,))]),
        ("a <3 b > c <lora:> <:x> <lora x>", "a <3 b > c <lora:> <:x> <lora x>", []),
    ],
)
def test_extract_extra_networks(
    prompt: str, text: str, networks: list[tuple[str, str, tuple[float, ...]]]
) -> None:
    remaining, found = extract_extra_networks(prompt)
    assert remaining == text
    assert [(tag.kind, tag.name, tag.multipliers) for tag in found] == networks
    assert all(isinstance(tag, ExtraNetwork) and tag.text in prompt for tag in found)
    assert (
        "".join(prompt.split(tag.text, 1)[0] for tag in found[:1]) == prompt[: prompt.find("<")] or not found
    )


def test_tags_removed_before_attention_parsing() -> None:
    """A name holding brackets must not weigh the prompt, and a tag inside parentheses leaves the group."""
    text, _ = extract_extra_networks("(<lora:[XL]Bloodborne:0.5> cat:1.2), dog")
    assert parse_prompt_attention(text) == [(" cat", 1.2), (", dog", 1.0)]


@pytest.mark.parametrize(
    "tag", ["<lora:x:abc>", "<lora:x:>", "<lora:x:nan>", "<lora:x:inf>", "<lora:x:1e400>"]
)
def test_bad_multiplier_is_one_line(tag: str) -> None:
    with pytest.raises(RequestError, match="is not a number") as caught:
        extract_extra_networks(f"a cat {tag}")
    assert "\n" not in str(caught.value) and tag in str(caught.value)
