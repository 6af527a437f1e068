"""Weighted prompt fragments to CLIP's 77-position chunks, as A1111 lays out long prompts.

Rules (A1111's documented behaviour, written here from them): each fragment of the attention parse is
tokenized on its own, so BPE never merges across a weight boundary; the tokens fill chunks of
``max_length - 2`` (75) tokens; when a chunk is full, the next token is not a comma and the chunk's
last comma sits within its last ``COMMA_BACKTRACK`` (20) tokens, the tokens after that comma move to
the next chunk, their weights with them; BREAK ends the current chunk (an empty one when nothing is
in it yet); a prompt with no tokens is one chunk. Each chunk is framed as
``[bos] + tokens + [eos] + [pad] * (75 - len(tokens))`` with the tokenizer's pad id (SD 1: eos;
SD 2: "!", id 0, which is what A1111 writes after the first eos); for a prompt of up to 75 tokens
that is exactly the ids diffusers' tokenizer gives. (A typed "<|endoftext|>" stays a token in its
place, as in diffusers; A1111 pads every position after the first eos, typed or not.) Weights: one
per position, 1.0 at bos, eos and padding, float32 (a weight beyond float32's range saturates at its
largest value).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.text.prompt import extract_extra_networks, parse_fragments
from engine.text.tokenizer import ClipTokenizer

COMMA_BACKTRACK = 20
# The longest conditioning a request may ask for: 8 chunks, 8 * 77 = 616 positions (600 prompt tokens).
# Graph profiles (TensorRT, the fused-guidance UNet) are built to cover it.
MAX_CHUNKS = 8

FLOAT32_MAX = float(np.finfo(np.float32).max)  # weights beyond it saturate (the embedding then fails)

Token = tuple[int, float]  # (token id, weight)


@dataclass(frozen=True)
class PromptChunks:
    """A prompt's chunks: ``ids`` (k, max_length) int64, ``weights`` (k, max_length) float32, and
    ``token_count``, the prompt's text tokens (no bos / eos / padding), k >= 1."""

    ids: np.ndarray
    weights: np.ndarray
    token_count: int

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])


def chunk_prompt(prompt: str, tokenizer: ClipTokenizer) -> PromptChunks:
    """``prompt`` with its extra-network tags removed, parsed for weights and BREAK, in chunks.

    Raises RequestError (one line) only for a malformed extra-network tag (see
    extract_extra_networks); any other text is valid.
    """
    text, _ = extract_extra_networks(prompt)
    items: list[Token | None] = []  # None: a BREAK
    for fragment in parse_fragments(text):
        if fragment.is_break:
            items.append(None)
        else:
            items.extend((token, fragment.weight) for token in tokenizer.encode_unpadded(fragment.text))
    room = tokenizer.max_length - 2
    chunks = fill_chunks(items, comma_id(tokenizer), room, COMMA_BACKTRACK)
    ids = np.full((len(chunks), tokenizer.max_length), tokenizer.pad_id, dtype=np.int64)
    weights = np.ones((len(chunks), tokenizer.max_length), dtype=np.float32)
    for row, chunk in enumerate(chunks):
        ids[row, : len(chunk) + 2] = [tokenizer.bos_id, *(token for token, _ in chunk), tokenizer.eos_id]
        weights[row, 1 : len(chunk) + 1] = np.clip([weight for _, weight in chunk], -FLOAT32_MAX, FLOAT32_MAX)
    return PromptChunks(ids, weights, sum(len(chunk) for chunk in chunks))


def comma_id(tokenizer: ClipTokenizer) -> int | None:
    """The id of "," as a word of its own (",</w>" in CLIP's vocabulary); None when it is not one token."""
    ids = tokenizer.encode_unpadded(",")
    return ids[0] if len(ids) == 1 else None


def fill_chunks(
    items: Sequence[Token | None], comma: int | None, room: int, backtrack: int
) -> list[list[Token]]:
    """Tokens (None: a BREAK) into chunks of at most ``room`` tokens, backing off to the last comma.

    Returns at least one chunk; a chunk may be empty (a BREAK with nothing before it).
    """
    chunks: list[list[Token]] = []
    current: list[Token] = []
    last_comma = -1  # index in ``current`` of its last comma
    for item in items:
        if item is None:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        if item[0] == comma:
            last_comma = len(current)
        elif len(current) == room and last_comma >= 0 and room - last_comma <= backtrack:
            chunks.append(current[: last_comma + 1])
            current, last_comma = current[last_comma + 1 :], -1
        if len(current) == room:
            chunks.append(current)
            current, last_comma = [], -1
        current.append(item)
    if current or not chunks:
        chunks.append(current)
    return chunks
