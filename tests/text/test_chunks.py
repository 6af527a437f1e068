"""engine.text.chunks: weighted tokens into 77-position chunks (A1111's layout), real CLIP vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.errors import RequestError
from engine.text.chunks import PromptChunks, chunk_prompt
from engine.text.tokenizer import (
    SD2_PAD_TOKEN,
    ClipTokenizer,
    bundled_bpe_path,
    bundled_clip_tokenizer,
    write_tokenizer_folder,
)

transformers = pytest.importorskip("transformers")

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def sd1() -> ClipTokenizer:
    return bundled_clip_tokenizer()


@pytest.fixture(scope="module")
def sd2() -> ClipTokenizer:
    return bundled_clip_tokenizer(pad_token=SD2_PAD_TOKEN)


def ids_of(tokenizer: ClipTokenizer, text: str) -> list[int]:
    return tokenizer.encode_unpadded(text)


def text_of(chunks: PromptChunks, row: int) -> np.ndarray:
    """The text tokens of one chunk: between its bos and its (first) eos."""
    ids = chunks.ids[row]
    assert ids[0] == BOS
    end = int(np.flatnonzero(ids == EOS)[0])
    return ids[1:end]


def expect_layout(chunks: PromptChunks, rows: list[list[int]], pad: int) -> None:
    """Exact ids: [bos] + tokens + [eos] + pad for each expected row."""
    expected = np.full((len(rows), 77), pad, dtype=np.int64)
    for index, tokens in enumerate(rows):
        expected[index, : len(tokens) + 2] = [BOS, *tokens, EOS]
    np.testing.assert_array_equal(chunks.ids, expected)
    assert chunks.ids.dtype == np.int64 and chunks.weights.dtype == np.float32
    assert chunks.weights.shape == chunks.ids.shape
    assert chunks.token_count == sum(len(tokens) for tokens in rows)


# --- comma back-off ---------------------------------------------------------------------------


def test_single_word_tokens(sd1: ClipTokenizer) -> None:
    """The cases below count on these words being one token each."""
    for word in ("cat", "dog", ","):
        assert len(ids_of(sd1, word)) == 1


@pytest.mark.parametrize("comma_at", [55, 60, 74])
def test_comma_within_last_20_moves_the_rest(sd1: ClipTokenizer, comma_at: int) -> None:
    """Full at 75 with the last comma at index >= 55: the tokens after it start chunk 2."""
    cat, dog, comma = ids_of(sd1, "cat")[0], ids_of(sd1, "dog")[0], ids_of(sd1, ",")[0]
    after = 75 - comma_at - 1
    prompt = "cat " * comma_at + ", " + "dog " * (after + 5)
    chunks = chunk_prompt(prompt, sd1)
    expect_layout(chunks, [[cat] * comma_at + [comma], [dog] * (after + 5)], EOS)


def test_comma_21_back_does_not_move(sd1: ClipTokenizer) -> None:
    cat, dog, comma = ids_of(sd1, "cat")[0], ids_of(sd1, "dog")[0], ids_of(sd1, ",")[0]
    prompt = "cat " * 54 + ", " + "dog " * 25  # comma at index 54: 21 from the end
    chunks = chunk_prompt(prompt, sd1)
    expect_layout(chunks, [[cat] * 54 + [comma] + [dog] * 20, [dog] * 5], EOS)


def test_next_token_comma_does_not_move(sd1: ClipTokenizer) -> None:
    """A comma at index 60, the chunk full, and the next token itself a comma: no back-off."""
    cat, dog, comma = ids_of(sd1, "cat")[0], ids_of(sd1, "dog")[0], ids_of(sd1, ",")[0]
    prompt = "cat " * 60 + ", " + "cat " * 14 + ", dog"
    chunks = chunk_prompt(prompt, sd1)
    expect_layout(chunks, [[cat] * 60 + [comma] + [cat] * 14, [comma, dog]], EOS)


def test_weights_move_with_their_tokens(sd1: ClipTokenizer) -> None:
    prompt = "cat " * 60 + ", (" + "dog " * 20 + ":1.3)"
    chunks = chunk_prompt(prompt, sd1)
    assert chunks.count == 2
    np.testing.assert_array_equal(chunks.weights[0], np.ones(77, np.float32))
    want = np.ones(77, np.float32)
    want[1:21] = np.float32(1.3)
    np.testing.assert_array_equal(chunks.weights[1], want)
    assert len(text_of(chunks, 1)) == 20


# --- BREAK ------------------------------------------------------------------------------------


def test_break_first_gives_an_all_padding_chunk(sd1: ClipTokenizer) -> None:
    expect_layout(chunk_prompt("BREAK a red cat", sd1), [[], ids_of(sd1, "a red cat")], EOS)


def test_double_break_gives_an_all_padding_chunk(sd1: ClipTokenizer) -> None:
    expect_layout(chunk_prompt("a BREAK BREAK b", sd1), [ids_of(sd1, "a"), [], ids_of(sd1, "b")], EOS)


def test_spacing_kept_inside_chunks(sd1: ClipTokenizer) -> None:
    chunks = chunk_prompt("x BREAK a red cat", sd1)
    assert list(text_of(chunks, 1)) == ids_of(sd1, "a red cat") != ids_of(sd1, "aredcat")


def test_break_then_comma_starts_chunk_two_with_the_comma(sd1: ClipTokenizer) -> None:
    chunks = chunk_prompt("a red cat BREAK, a blue dog", sd1)
    expect_layout(chunks, [ids_of(sd1, "a red cat"), ids_of(sd1, ", a blue dog")], EOS)
    assert text_of(chunks, 1)[0] == ids_of(sd1, ",")[0]


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("a break b", 1), ("a\nb", 1), ("a\nBREAK\nb", 2), ("a BREAK", 1), ("BREAK", 1), ("(a BREAK b)", 1)],
)
def test_what_breaks(sd1: ClipTokenizer, prompt: str, count: int) -> None:
    """Lower-case break is a word, a newline is whitespace, a trailing BREAK adds no chunk, BREAK in
    brackets is the word BREAK (A1111's quirk)."""
    assert chunk_prompt(prompt, sd1).count == count


def test_break_in_brackets_is_the_word_with_weight(sd1: ClipTokenizer) -> None:
    chunks = chunk_prompt("(a BREAK b)", sd1)
    assert list(text_of(chunks, 0)) == ids_of(sd1, "a") + ids_of(sd1, "BREAK") + ids_of(sd1, "b")
    np.testing.assert_array_equal(chunks.weights[0, 1:4], np.float32([1.1, -1.1, 1.1]))


def test_break_exactly_after_a_full_chunk_adds_no_empty_chunk(sd1: ClipTokenizer) -> None:
    cat, dog = ids_of(sd1, "cat")[0], ids_of(sd1, "dog")[0]
    expect_layout(chunk_prompt("cat " * 75 + "BREAK dog", sd1), [[cat] * 75, [dog]], EOS)


# --- sizes, padding, framing ------------------------------------------------------------------


def test_empty_prompt_is_one_chunk(sd1: ClipTokenizer) -> None:
    chunks = chunk_prompt("", sd1)
    expect_layout(chunks, [[]], EOS)
    np.testing.assert_array_equal(chunks.weights, np.ones((1, 77), np.float32))


def test_more_than_150_tokens_is_three_chunks(sd1: ClipTokenizer) -> None:
    cat = ids_of(sd1, "cat")[0]
    chunks = chunk_prompt("cat " * 160, sd1)
    expect_layout(chunks, [[cat] * 75, [cat] * 75, [cat] * 10], EOS)


def test_sd2_pads_with_zero_after_the_first_eos(sd2: ClipTokenizer) -> None:
    assert sd2.pad_id == 0
    cat = ids_of(sd2, "cat")[0]
    chunks = chunk_prompt("cat " * 80, sd2)
    expect_layout(chunks, [[cat] * 75, [cat] * 5], 0)
    assert (chunks.ids[1, 7:] == 0).all()


def test_sd1_pads_with_eos(sd1: ClipTokenizer) -> None:
    assert (chunk_prompt("a cat", sd1).ids[0, 3:] == EOS).all()


def test_weights_one_per_position(sd1: ClipTokenizer) -> None:
    chunks = chunk_prompt("a (red:1.5) [cat]", sd1)
    want = np.ones(77, np.float32)
    want[2], want[3] = 1.5, 1 / 1.1
    np.testing.assert_array_equal(chunks.weights[0], want)


def test_fragments_tokenized_on_their_own(sd1: ClipTokenizer) -> None:
    """BPE never merges across a weight boundary: "(sun)flower" is "sun" + "flower", not "sunflower"."""
    chunks = chunk_prompt("(sun)flower", sd1)
    assert list(text_of(chunks, 0)) == ids_of(sd1, "sun") + ids_of(sd1, "flower")
    assert ids_of(sd1, "sunflower") != ids_of(sd1, "sun") + ids_of(sd1, "flower")


def test_tags_removed_before_chunking(sd1: ClipTokenizer) -> None:
    np.testing.assert_array_equal(
        chunk_prompt("a <lora:[XL]Bloodborne:0.5>cat", sd1).ids, chunk_prompt("a cat", sd1).ids
    )
    with pytest.raises(RequestError):
        chunk_prompt("a <lora:x:abc> cat", sd1)


# --- diffusers parity for prompts that fit ----------------------------------------------------

PLAIN_PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "A Photo OF a CAT, best quality, 8k",
    "café naïve 猫の写真 😀 <|endoftext|> done",
    "tabs\tand\nnewlines",
    "masterpiece, " * 37,  # 74 tokens
    "cat " * 75,  # exactly 75: no padding
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_folder(bundled_bpe_path(), tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", SD2_PAD_TOKEN])
def test_unweighted_prompt_matches_diffusers_ids(vocab_folder: Path, pad_token: str) -> None:
    """diffusers' tokenizer call (padding="max_length", truncation=True) on SD 1 / SD 2 tokenizers."""
    files = [str(vocab_folder / name) for name in ("vocab.json", "merges.txt")]
    reference = transformers.CLIPTokenizer(*files, pad_token=pad_token)
    ours = bundled_clip_tokenizer(pad_token=pad_token)
    assert ours.pad_id == reference.pad_token_id
    for prompt in PLAIN_PROMPTS:
        assert len(ours.encode_unpadded(prompt)) <= 75, prompt
        want = reference([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np")
        chunks = chunk_prompt(prompt, ours)
        assert chunks.count == 1
        np.testing.assert_array_equal(chunks.ids, want.input_ids.astype(np.int64), err_msg=repr(prompt))


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=120), st.text(alphabet="()[]:\\ ,.019-catBREAK\n<>lora", max_size=200)))
def test_fuzz_chunks_well_formed(sd1: ClipTokenizer, prompt: str) -> None:
    """Any text: framed chunks (bos, tokens, one eos, padding), finite weights; only a malformed
    extra-network tag may raise, and then a RequestError."""
    assume("oftext|>" not in prompt.lower())  # a typed bos / eos would blur where the framing eos is
    try:
        chunks = chunk_prompt(prompt, sd1)
    except RequestError:
        return
    assert chunks.count >= 1 and chunks.ids.shape == chunks.weights.shape == (chunks.count, 77)
    assert (chunks.ids[:, 0] == BOS).all() and np.isfinite(chunks.weights).all()
    lengths = [len(text_of(chunks, row)) for row in range(chunks.count)]
    assert max(lengths) <= 75 and sum(lengths) == chunks.token_count
    for row, length in enumerate(lengths):
        assert (chunks.weights[row, length + 1 :] == 1).all() and chunks.weights[row, 0] == 1
