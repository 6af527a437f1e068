"""Text conditioning: embeddings of prompts, cached per (prompt, clip_skip)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

EMBEDDING_CACHE_SIZE = 64


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
