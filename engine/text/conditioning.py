"""Text conditioning: embeddings of prompts, cached per (prompt, clip_skip) across requests."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

EMBEDDING_CACHE_SIZE = 64


def truncation_warning(tokens: int, max_length: int, what: str) -> str | None:
    """The line to warn with when a prompt of ``tokens`` BPE tokens (no start/end token) is longer
    than the ``max_length - 2`` CLIP reads; None when it fits. Until long prompts are chunked
    (A1111's 75-token chunks), the rest is cut as diffusers cuts it."""
    room = max_length - 2
    if tokens <= room:
        return None
    return (
        f"{what} is {tokens} tokens; CLIP reads the first {room}, the last {tokens - room} are ignored "
        "(long prompts are not supported yet)"
    )


class EmbeddingCache:
    """A small LRU of text embeddings keyed on (prompt, clip_skip): services repeat prompts."""

    def __init__(self, size: int = EMBEDDING_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: np.ndarray) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def embed(
        self, texts: Sequence[str], clip_skip: int, encode: Callable[[list[str]], np.ndarray]
    ) -> np.ndarray:
        """Embeddings (N, 77, D) for ``texts``: hits from the LRU, the distinct misses in one ``encode``.

        This call's embeddings are gathered in a local dict, so the LRU may evict freely while it
        fills: a request with more distinct texts than the cache holds still gets every one.
        ``encode(texts)`` returns (len(texts), 77, D); its rows are copied before they are kept.
        """
        found: dict[str, np.ndarray] = {}
        for text in dict.fromkeys(texts):
            cached = self.get((text, clip_skip))
            if cached is not None:
                found[text] = cached
        missing = [text for text in dict.fromkeys(texts) if text not in found]
        if missing:
            for text, embedding in zip(missing, encode(missing), strict=True):
                found[text] = np.array(embedding, copy=True)
                self.put((text, clip_skip), found[text])
        return np.stack([found[text] for text in texts])
