"""Text conditioning: A1111-weighted embeddings of long prompts, their chunks cached across requests.

A prompt is chunked (engine.text.chunks: weights, BREAK, 75-token chunks); each chunk goes through
the text encoder on its own; the output is multiplied by each position's weight and rescaled so the
chunk's mean (over its whole (77, D) array) equals the unweighted mean; the chunks are joined along
the token axis. Texts of one request with fewer chunks are padded with the empty prompt's encoding
(A1111's "pad conds"), so prompts and negative prompts share one (N, 77 * K, D) array.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from engine.errors import RequestError
from engine.text.chunks import MAX_CHUNKS, PromptChunks, chunk_prompt
from engine.text.tokenizer import ClipTokenizer

EMBEDDING_CACHE_SIZE = 64
EncodeIds = Callable[[np.ndarray], np.ndarray]  # ids (M, 77) int64 -> hidden states (M, 77, D)


class EmbeddingCache:
    """A small LRU of text-encoder outputs: services repeat prompts.

    ``encode_chunks`` keeps one entry per chunk, keyed on (the chunk's 77 ids, clip_skip, the caller's
    key for the text encoder's weights, e.g. the LoRAs applied to it). The entries are the encoder's
    unweighted output, so prompts that differ only in weights share them; weighting is a cheap
    multiply done per request.
    """

    def __init__(self, size: int = EMBEDDING_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def get(self, key: Hashable) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def encode_chunks(
        self, rows: Sequence[np.ndarray], context: Hashable, encode_ids: EncodeIds
    ) -> dict[bytes, np.ndarray]:
        """The encoder's output (77, D) for each chunk of ids (77,) int64 in ``rows``, by ``row.tobytes()``.

        Hits come from the LRU; every distinct miss goes into one ``encode_ids`` call. ``context``
        (clip_skip, weights key) is part of each entry's key. This call's results are gathered locally,
        so the LRU may evict while it fills: more distinct chunks than it holds still all come back.
        Raises ValueError when ``encode_ids`` returns a shape other than (misses, 77, D).
        """
        found: dict[bytes, np.ndarray] = {}
        missing: dict[bytes, np.ndarray] = {}
        for row in rows:
            key = np.ascontiguousarray(row, dtype=np.int64).tobytes()
            if key in found or key in missing:
                continue
            cached = self.get(("chunk", key, context))
            if cached is not None:
                found[key] = cached
            else:
                missing[key] = np.asarray(row, dtype=np.int64)
        if missing:
            ids = np.stack(list(missing.values()))
            outputs = np.asarray(encode_ids(ids))
            if outputs.ndim != 3 or outputs.shape[:2] != ids.shape:
                raise ValueError(f"encode_ids gave shape {outputs.shape} for ids {ids.shape}, not (M, S, D)")
            for key, output in zip(missing, outputs, strict=True):
                found[key] = np.array(output, copy=True)
                self.put(("chunk", key, context), found[key])
        return found


def encode_weighted(
    texts: Sequence[str],
    tokenizer: ClipTokenizer,
    encode_ids: EncodeIds,
    cache: EmbeddingCache,
    clip_skip: int,
    weights_key: Hashable = None,
) -> np.ndarray:
    """A1111-weighted conditioning (N, 77 * K, D) for ``texts`` (prompts and negatives of one request).

    K is the most chunks any text needs; shorter texts are padded with the empty prompt's encoding.
    ``encode_ids(ids (M, 77) int64) -> (M, 77, D)`` runs the text encoder with clip skip applied;
    each distinct chunk is encoded once, through ``cache`` (keyed with ``clip_skip`` and
    ``weights_key``, which names the text encoder's weight state, e.g. its LoRAs). The output has
    the encoder's dtype (float32). Raises RequestError, one line: a text past MAX_CHUNKS chunks, a
    malformed extra-network tag, or weights that make a chunk's embedding non-finite.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if not texts:
        raise ValueError("texts is empty: at least one prompt is needed")
    prompts = {text: chunk_prompt(text, tokenizer) for text in dict.fromkeys(texts)}
    for text, chunks in prompts.items():
        check_chunk_limit(text, chunks)
    count = max(chunks.count for chunks in prompts.values())
    empty = chunk_prompt("", tokenizer).ids[0]
    rows = [row for chunks in prompts.values() for row in chunks.ids]
    if any(chunks.count < count for chunks in prompts.values()):
        rows.append(empty)
    encoded = cache.encode_chunks(rows, (clip_skip, weights_key), encode_ids)
    joined = {
        text: join_chunks(text, chunks, encoded, encoded.get(empty.tobytes()), count)
        for text, chunks in prompts.items()
    }
    return np.stack([joined[text] for text in texts])


def join_chunks(
    text: str,
    chunks: PromptChunks,
    encoded: dict[bytes, np.ndarray],
    empty: np.ndarray | None,
    count: int,
) -> np.ndarray:
    """One text's weighted chunks joined along the token axis, padded to ``count`` chunks with
    ``empty`` (the empty prompt's encoding): (77 * count, D)."""
    parts = []
    for ids, weights in zip(chunks.ids, chunks.weights, strict=True):
        part = weight_chunk(encoded[ids.tobytes()], weights)
        if not np.isfinite(part).all():
            raise RequestError(
                f"prompt {excerpt(text)}: its weights make the text embedding non-finite "
                "(a weight too large, or weights that cancel a chunk's mean)"
            )
        parts.append(part)
    parts.extend([empty] * (count - len(parts)))
    return np.concatenate(parts, axis=0)


def weight_chunk(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's emphasis: ``hidden`` (S, D) times each position's weight (S,), rescaled so its mean over
    all (S, D) values equals the unweighted mean. All weights 1.0: ``hidden`` itself, untouched."""
    if np.all(weights == 1.0):
        return hidden
    original = hidden.mean(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # the caller checks finiteness
        weighted = hidden.astype(np.float32) * np.asarray(weights, dtype=np.float32)[:, None]
        scale = np.float32(original / weighted.mean(dtype=np.float64))
        return (weighted * scale).astype(hidden.dtype, copy=False)


def check_chunk_limit(text: str, chunks: PromptChunks) -> None:
    """RequestError when ``text`` needs more than MAX_CHUNKS chunks (the graphs' profiles end there)."""
    if chunks.count > MAX_CHUNKS:
        positions = chunks.ids.shape[1]
        raise RequestError(
            f"prompt {excerpt(text)} is {chunks.token_count} tokens in {chunks.count} chunks "
            f"(BREAK and comma back-off included); the limit is {MAX_CHUNKS} chunks of "
            f"{positions - 2} tokens ({MAX_CHUNKS * positions} positions)"
        )


def excerpt(text: str, limit: int = 40) -> str:
    """A prompt quoted for an error line: its first ``limit`` characters, one line."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")
