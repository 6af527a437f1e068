"""engine.text.conditioning.encode_weighted against a torch reference built from A1111's rules.

The reference re-implements, in torch and independently of engine.text: tokenizing each fragment with
transformers' CLIPTokenizer, cutting 75-token chunks at BREAKs, framing bos / eos / pad, encoding each
chunk alone with transformers' CLIPTextModel (random weights, the tiny model's config), multiplying by
the weights, rescaling to the unweighted mean, joining, and padding shorter texts with the empty
prompt's encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import RequestError
from engine.text.chunks import MAX_CHUNKS, chunk_prompt
from engine.text.conditioning import EmbeddingCache, encode_weighted
from engine.text.prompt import parse_prompt_attention
from engine.text.tokenizer import ClipTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Segment = list[tuple[str, float]]  # a BREAK-free run of (fragment, weight)

# A weighted prompt of three chunks (two filled from the first segment, one after BREAK), no commas so
# the reference needs no comma back-off (tests/text/test_chunks.py covers it).
HOUSE = " in a quiet old house" * 8
LONG_SEGMENTS: list[Segment] = [
    [
        ("a photo of ", 1.0),
        ("a red cat", 1.3),
        (" on ", 1.0),
        ("a wooden table", 1 / 1.1),
        (" with ", 1.0),
        ("golden light", 1.1 * 1.1),
        (HOUSE, 1.0),
    ],
    [("blue sky", 0.8), (" and clouds", 1.0)],
]
LONG_PROMPT = (
    "a photo of (a red cat:1.3) on [a wooden table] with ((golden light))"
    + HOUSE
    + " BREAK (blue sky:0.8) and clouds"
)
NEGATIVE_SEGMENTS: list[Segment] = [[("blurry, low quality", 1.0)]]
NEGATIVE = "blurry, low quality"


class TorchEncoder:
    """transformers' CLIPTextModel as encode_ids (last_hidden_state), recording the rows of each call."""

    def __init__(self, model: object) -> None:
        self.model = model
        self.calls: list[np.ndarray] = []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[1] == 77
        self.calls.append(ids.copy())
        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> object:
    """The tiny model's text encoder with a random final layer norm: as initialised (scale 1, shift 0)
    every position's output has mean ~1e-8, which makes A1111's mean rescale pure noise; trained
    encoders have a real shift, as this one now does."""
    encoder = transformers.CLIPTextModel.from_pretrained(str(tiny_model / "text_encoder")).eval()
    norm = encoder.final_layer_norm
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
        norm.bias.copy_(0.3 + 0.5 * torch.randn(norm.bias.shape, generator=generator))
    return encoder


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model: Path) -> object:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"))
    tokenizer.model_max_length = 10**6  # fragments are tokenized unframed: no "longer than 77" warning
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> ClipTokenizer:
    return ClipTokenizer.from_folder(tiny_model / "tokenizer")


def reference_chunks(hf: object, segments: list[Segment]) -> list[tuple[list[int], list[float]]]:
    """Each fragment tokenized alone, each segment cut into 75-token chunks (one empty chunk if empty)."""
    chunks = []
    for segment in segments:
        tokens = [(t, w) for text, w in segment for t in hf(text, add_special_tokens=False).input_ids]
        pieces = [tokens[start : start + 75] for start in range(0, len(tokens), 75)] or [[]]
        chunks.extend(([t for t, _ in piece], [w for _, w in piece]) for piece in pieces)
    return chunks


def reference_chunk(model: object, hf: object, tokens: list[int], weights: list[float]) -> torch.Tensor:
    """One chunk: framed, encoded alone, weighted, rescaled to the unweighted mean: (77, D)."""
    ids = torch.full((1, 77), hf.pad_token_id, dtype=torch.int64)
    ids[0, : len(tokens) + 2] = torch.tensor([hf.bos_token_id, *tokens, hf.eos_token_id])
    scale = torch.ones(77)
    scale[1 : len(tokens) + 1] = torch.tensor(weights, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]
    mean = hidden.mean()
    weighted = hidden * scale[:, None]
    return weighted * (mean / weighted.mean())


def reference_conditioning(model: object, hf: object, texts: list[list[Segment]]) -> np.ndarray:
    """(N, 77 * K, D): each text's chunks joined, shorter texts padded with the empty prompt's chunk."""
    encoded = [[reference_chunk(model, hf, *chunk) for chunk in reference_chunks(hf, text)] for text in texts]
    count = max(len(parts) for parts in encoded)
    empty = reference_chunk(model, hf, [], [])
    rows = [torch.cat(parts + [empty] * (count - len(parts))) for parts in encoded]
    return torch.stack(rows).numpy()


def test_prompts_parse_to_the_reference_fragments(tokenizer: ClipTokenizer) -> None:
    """The reference's hand-written fragments are what the prompt means (empty ones tokenize to
    nothing); the long prompt is 3 chunks."""
    parsed = [(text, weight) for text, weight in parse_prompt_attention(LONG_PROMPT) if text]
    breaks = [index for index, piece in enumerate(parsed) if piece == ("BREAK", -1.0)]
    assert len(breaks) == 1
    for got, want in [(parsed[: breaks[0]], LONG_SEGMENTS[0]), (parsed[breaks[0] + 1 :], LONG_SEGMENTS[1])]:
        assert [text for text, _ in got] == [text for text, _ in want]
        np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)
    assert chunk_prompt(LONG_PROMPT, tokenizer).count == 3
    assert chunk_prompt(NEGATIVE, tokenizer).count == 1


def test_weighted_long_prompt_matches_reference(
    model: object, hf_tokenizer: object, tokenizer: ClipTokenizer
) -> None:
    encoder = TorchEncoder(model)
    ours = encode_weighted([LONG_PROMPT], tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    want = reference_conditioning(model, hf_tokenizer, [LONG_SEGMENTS])
    assert ours.shape == want.shape == (1, 3 * 77, model.config.hidden_size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 3


def test_prompt_and_negative_padded_with_empty_prompt(
    model: object, hf_tokenizer: object, tokenizer: ClipTokenizer
) -> None:
    """Pad conds: the 1-chunk negative is joined with two encodings of the empty prompt."""
    encoder = TorchEncoder(model)
    texts = [NEGATIVE, LONG_PROMPT, LONG_PROMPT, NEGATIVE]
    ours = encode_weighted(texts, tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    want = reference_conditioning(model, hf_tokenizer, [NEGATIVE_SEGMENTS, LONG_SEGMENTS])
    assert ours.shape == (4, 3 * 77, model.config.hidden_size)
    np.testing.assert_allclose(ours[:2], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours[2:], ours[1::-1])
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 5  # 3 + 1 chunks + the empty prompt


def test_unweighted_chunks_are_bit_exact(model: object, tokenizer: ClipTokenizer) -> None:
    """All-1.0 chunks skip the multiply: exactly the encoder's output, here a 2-chunk prompt."""
    prompt = "a photo of a cat" + HOUSE
    chunks = chunk_prompt(prompt, tokenizer)
    assert chunks.count == 2 and (chunks.weights == 1).all()
    raw = TorchEncoder(model)(chunks.ids)
    ours = encode_weighted([prompt], tokenizer, TorchEncoder(model), EmbeddingCache(), clip_skip=1)
    np.testing.assert_array_equal(ours[0], raw.reshape(-1, raw.shape[-1]))


def test_weighted_chunk_keeps_its_mean(model: object, tokenizer: ClipTokenizer) -> None:
    encoder = TorchEncoder(model)
    weighted = encode_weighted(["a (red:1.5) [cat]"], tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    plain = encode_weighted(["a red cat"], tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    assert weighted[0].mean() == pytest.approx(plain[0].mean(), abs=1e-6)
    assert not np.array_equal(weighted, plain)


# --- the cache --------------------------------------------------------------------------------


def test_cache_hits_and_keys(model: object, tokenizer: ClipTokenizer) -> None:
    encoder, cache = TorchEncoder(model), EmbeddingCache()
    first = encode_weighted([NEGATIVE, LONG_PROMPT], tokenizer, encoder, cache, clip_skip=1)
    again = encode_weighted([NEGATIVE, LONG_PROMPT], tokenizer, encoder, cache, clip_skip=1)
    np.testing.assert_array_equal(first, again)
    assert len(encoder.calls) == 1
    # Same ids, other weights: the unweighted chunk outputs are reused, the weighting redone.
    reweighted = encode_weighted(
        [LONG_PROMPT.replace(":1.3", ":1.6")], tokenizer, encoder, cache, clip_skip=1
    )
    assert len(encoder.calls) == 1 and not np.array_equal(reweighted[0], first[1])
    # clip skip and the text encoder's weight state (LoRAs) are part of the key.
    encode_weighted([NEGATIVE], tokenizer, encoder, cache, clip_skip=2)
    encode_weighted([NEGATIVE], tokenizer, encoder, cache, clip_skip=1, weights_key=("lora", "x", 0.8))
    assert [len(call) for call in encoder.calls] == [5, 1, 1]
    # A new long prompt with the same negative: only its chunks are encoded; the padding chunk is cached.
    encode_weighted([NEGATIVE, LONG_PROMPT + " again"], tokenizer, encoder, cache, clip_skip=1)
    assert len(encoder.calls[-1]) == 1  # only its last chunk differs


def test_more_chunks_than_the_cache_holds(model: object, tokenizer: ClipTokenizer) -> None:
    encoder = TorchEncoder(model)
    big = encode_weighted([NEGATIVE, LONG_PROMPT], tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    small = encode_weighted([NEGATIVE, LONG_PROMPT], tokenizer, encoder, EmbeddingCache(size=2), clip_skip=1)
    np.testing.assert_array_equal(small, big)


def test_chunk_limit(model: object, tokenizer: ClipTokenizer) -> None:
    assert len(tokenizer.encode_unpadded("a " * 601)) == 601
    encoder = TorchEncoder(model)
    limit = encode_weighted(["a " * 600], tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    assert limit.shape[1] == MAX_CHUNKS * 77 == 616
    with pytest.raises(RequestError, match=r"is 601 tokens in 9 chunks.*limit is 8 chunks") as caught:
        encode_weighted(["a " * 601], tokenizer, encoder, EmbeddingCache(), clip_skip=1)
    assert "\n" not in str(caught.value)
    assert len(encoder.calls) == 1  # the refused prompt encoded nothing


def test_non_finite_weights_are_refused(model: object, tokenizer: ClipTokenizer) -> None:
    with pytest.raises(RequestError, match="non-finite"):
        encode_weighted(["(cat:" + "9" * 300 + ")"], tokenizer, TorchEncoder(model), EmbeddingCache(), 1)


def test_single_string_refused(model: object, tokenizer: ClipTokenizer) -> None:
    with pytest.raises(TypeError):
        encode_weighted("a cat", tokenizer, TorchEncoder(model), EmbeddingCache(), 1)  # type: ignore[arg-type]
