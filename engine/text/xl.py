"""SDXL conditioning: two text encoders, the pooled embedding and the size conditioning (time ids).

As diffusers' StableDiffusionXLPipeline builds it (``encode_prompt``, ``_get_add_time_ids``):

- context: each encoder's penultimate hidden states (no final layer norm), CLIP-L's 768 and
  OpenCLIP-bigG's 1280 joined along the feature axis (2048). Long prompts and A1111's weights apply to
  each encoder on its own (:func:`engine.text.conditioning.encode_weighted`, tokenizer 2 padding with
  "!"), so a K-chunk prompt gives (77 K, 2048): chunk by chunk [encoder 1 | encoder 2].
- pooled (``text_embeds``): encoder 2's projected output for the prompt's *first* chunk only, one
  (P,) vector per text, unweighted (A1111 takes it from the first chunk too).
- an empty negative prompt is zeros in both (``force_zeros_for_empty_prompt``), not the encoding of "".
- time ids: (original height, original width, crop top, crop left, target height, target width), with
  original = target = the image size and crop (0, 0), diffusers' defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import RequestError
from engine.text.chunks import chunk_prompt
from engine.text.conditioning import EmbeddingCache, encode_weighted
from engine.text.tokenizer import ClipTokenizer

# ids (M, 77) int64 -> (hidden states at the chosen layer (M, 77, D), text_embeds (M, P) or None)
EncodeXl = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
TIME_IDS = 6  # SDXL base: original size, crop top-left, target size (the refiner's 5 are not supported)


@dataclass(frozen=True)
class XlEncoder:
    """One SDXL text encoder as the conditioning sees it: its tokenizer and a function running it.

    ``encode(ids)`` returns the hidden states the conditioning uses (M, 77, D) and, for the second
    encoder, its pooled ``text_embeds`` (M, P) (None for the first).
    """

    tokenizer: ClipTokenizer
    encode: EncodeXl


def encode_xl(
    texts: Sequence[str],
    encoders: tuple[XlEncoder, XlEncoder],
    cache: EmbeddingCache,
    clip_skip: int,
    weights_key: Hashable = (),
    zero_empty: frozenset[int] = frozenset(),
) -> tuple[np.ndarray, np.ndarray]:
    """SDXL conditioning for ``texts``: context (N, 77 K, D1 + D2) float32 and pooled (N, P) float32.

    Rows whose index is in ``zero_empty`` (empty negative prompts under force_zeros_for_empty_prompt)
    are zeros in both. Every distinct chunk runs through each encoder once, through ``cache``. Raises
    RequestError (one line) as :func:`encode_weighted` does, or when the two tokenizers chunk a text
    differently (their vocabularies differ).
    """
    pooled_store: dict[bytes, np.ndarray] = {}
    parts = []
    for index, encoder in enumerate(encoders):
        keep = _pooled_keeper(encoder, pooled_store, cache, (index, clip_skip, weights_key))
        key = ("xl", index, weights_key)
        parts.append(encode_weighted(texts, encoder.tokenizer, keep, cache, clip_skip, key))
    if parts[0].shape[:2] != parts[1].shape[:2]:
        raise RequestError(
            f"the two tokenizers split the prompts into {parts[0].shape[1] // 77} and "
            f"{parts[1].shape[1] // 77} chunks: this model's tokenizer and tokenizer_2 do not match"
        )
    context = np.concatenate(parts, axis=-1)
    pooled = first_chunk_pooled(texts, encoders[1], pooled_store, cache, (1, clip_skip, weights_key))
    for row in zero_empty:
        context[row] = 0.0
        pooled[row] = 0.0
    return context, pooled


def _pooled_keeper(
    encoder: XlEncoder, store: dict[bytes, np.ndarray], cache: EmbeddingCache, context: Hashable
) -> Callable[[np.ndarray], np.ndarray]:
    """``encoder.encode`` as encode_weighted wants it (ids -> hidden states), keeping the pooled vectors
    it also gives in ``store`` and ``cache``, so the first chunks' pooled outputs cost no extra run."""

    def encode(ids: np.ndarray) -> np.ndarray:
        hidden, pooled = encoder.encode(ids)
        if pooled is not None:
            for row, vector in zip(ids, pooled, strict=True):
                key = np.ascontiguousarray(row, dtype=np.int64).tobytes()
                store[key] = np.array(vector, copy=True)
                cache.put(("pooled", key, context), store[key])
        return hidden

    return encode


def first_chunk_pooled(
    texts: Sequence[str],
    encoder: XlEncoder,
    store: dict[bytes, np.ndarray],
    cache: EmbeddingCache,
    context: Hashable,
) -> np.ndarray:
    """Encoder 2's pooled output (N, P) for each text's first chunk: from this call's runs, the cache,
    or one more run over the chunks found in neither."""
    firsts = [chunk_prompt(text, encoder.tokenizer).ids[0] for text in texts]
    keys = [row.tobytes() for row in firsts]
    for key in keys:
        if key not in store:
            cached = cache.get(("pooled", key, context))
            if cached is not None:
                store[key] = cached
    missing = {key: row for key, row in zip(keys, firsts, strict=True) if key not in store}
    if missing:
        _, pooled = encoder.encode(np.stack(list(missing.values())))
        if pooled is None:
            raise ValueError("the second SDXL text encoder gave no text_embeds")
        for key, vector in zip(missing, pooled, strict=True):
            store[key] = np.array(vector, copy=True)
            cache.put(("pooled", key, context), store[key])
    return np.stack([store[key] for key in keys]).astype(np.float32)


def time_ids(height: int, width: int, rows: int) -> np.ndarray:
    """SDXL's size conditioning (rows, 6) float32: original size = target size = (height, width) pixels,
    crop top-left (0, 0), as diffusers' StableDiffusionXLPipeline defaults them."""
    ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
    return np.tile(ids, (rows, 1))
