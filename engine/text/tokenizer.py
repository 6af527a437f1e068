"""The runtime's CLIP tokenizer: the `tokenizers` library set up exactly like transformers' CLIPTokenizer.

A tokenizer folder comes in two layouts: tokenizer.json (+ tokenizer_config.json), which transformers 5's
save_pretrained writes, or vocab.json + merges.txt (+ configs), which older folders (SD 1.5, SD 2.1)
ship. Either way only the BPE vocabulary, the merges and the special / added tokens are read from it.

transformers 5 builds CLIPTokenizer on `tokenizers` with: NFC, every run of whitespace replaced by one
space, lowercase (no ftfy, no strip); CLIP's regex split then byte-level mapping; BPE with the "</w>"
word suffix; named special tokens (bos, eos, unk, pad) as added tokens, so a pad token such as SD 2's
"!" is matched in the prompt itself. We mirror that so the runtime needs neither torch nor transformers,
and frame the ids (bos, 75 tokens, eos, padding) ourselves so the same tokenizer also serves the
unpadded, untruncated encoding that long-prompt chunking needs.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from engine.errors import EngineFolderError
from engine.fsutil import write_atomic

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_JSON_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD2_PAD_TOKEN = "!"
DEFAULT_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"

# transformers' CLIPTokenizer pre-split: special tokens, contractions, letter runs, single digits,
# runs of other non-space characters; everything else (whitespace) is dropped.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The order transformers adds named special tokens in; a later one with the same text wins.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# transformers' "no limit" sentinel is int(1e30); anything this large means the folder set no length.
UNSET_MAX_LENGTH = 10**18


@dataclass(frozen=True)
class SpecialToken:
    """A special token as a tokenizer folder describes it; `normalized` decides what text it matches."""

    content: str
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False

    def added_token(self) -> AddedToken:
        return AddedToken(
            self.content,
            single_word=self.single_word,
            lstrip=self.lstrip,
            rstrip=self.rstrip,
            normalized=self.normalized,
            special=True,
        )


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json / special_tokens_map.json say: named tokens, added tokens, length."""

    bos: SpecialToken = SpecialToken(BOS_TOKEN)
    eos: SpecialToken = SpecialToken(EOS_TOKEN)
    unk: SpecialToken = SpecialToken(EOS_TOKEN)
    pad: SpecialToken = SpecialToken(EOS_TOKEN)
    added: tuple[SpecialToken, ...] = ()
    max_length: int = DEFAULT_MAX_LENGTH


@dataclass(frozen=True)
class BpeFiles:
    """What a tokenizer folder's vocabulary files hold, and how to name them in errors."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    added: tuple[SpecialToken, ...]  # tokenizer.json's "added_tokens", in id order; () for vocab.json
    vocab_source: str  # the file (and section) the vocabulary came from


class ClipTokenizer:
    """Prompt text to CLIP token ids, identical to transformers' CLIPTokenizer on the same folder."""

    def __init__(
        self, vocab: dict[str, int], merges: list[tuple[str, str]], settings: TokenizerSettings
    ) -> None:
        check_settings(vocab, settings, "the vocabulary")
        self._tokenizer = build_clip_tokenizer(vocab, merges, settings)
        self._max_length = settings.max_length
        self._bos_id = vocab[settings.bos.content]
        self._eos_id = vocab[settings.eos.content]
        self._pad_id = vocab[settings.pad.content]

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> ClipTokenizer:
        """Load a diffusers-style tokenizer folder, in either layout.

        tokenizer.json (what transformers 5 saves): the BPE vocabulary and merges from its "model"
        section and, unless tokenizer_config.json has "added_tokens_decoder", the added tokens from
        its "added_tokens". Where tokenizer.json exists, vocab.json and merges.txt are ignored even if
        present, as transformers 5's CLIPTokenizer.from_pretrained ignores them
        (TokenizersBackend.convert_to_native_format reads tokenizer.json first). Like CLIPTokenizer,
        the file's normalizer, pre-tokenizer, post-processor, padding and truncation are not used:
        the pipeline is CLIP's, built here, and the framing ours.

        Without tokenizer.json: vocab.json and merges.txt, both required.

        Raises EngineFolderError, one line naming the file: the folder or a needed file missing, a
        file unreadable or malformed, merges using tokens outside the vocabulary, a named special
        token outside the vocabulary.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise EngineFolderError(f"tokenizer folder not found: {folder}")
        json_path = folder / TOKENIZER_JSON_FILE
        bpe = read_tokenizer_json(json_path) if json_path.exists() else read_vocab_and_merges(folder)
        settings = read_settings(folder, bpe.added)
        check_settings(bpe.vocab, settings, bpe.vocab_source)
        return cls(bpe.vocab, bpe.merges, settings)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Ids (B, max_length) int64, like CLIPTokenizer(padding="max_length", truncation=True)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        batch = np.full((len(prompts), self._max_length), self._pad_id, dtype=np.int64)
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        for row, encoding in zip(batch, encodings, strict=True):
            ids = frame_ids(encoding.ids, self._bos_id, self._eos_id, self._max_length)
            row[: len(ids)] = ids
        return batch

    def encode_unpadded(self, prompt: str) -> list[int]:
        """Ids of the prompt's text alone: no bos/eos, no truncation (for long-prompt chunking)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        return list(self._tokenizer.encode(prompt, add_special_tokens=False).ids)


def check_settings(vocab: dict[str, int], settings: TokenizerSettings, vocab_name: str) -> None:
    """Named special tokens need ids the text encoder has embeddings for, and bos + eos need room."""
    for token in (settings.bos, settings.eos, settings.unk, settings.pad):
        if token.content not in vocab:
            raise EngineFolderError(f"tokenizer special token {token.content!r} is not in {vocab_name}")
    if settings.max_length < 2:
        raise EngineFolderError(f"tokenizer max_length {settings.max_length} leaves no room for bos and eos")


def frame_ids(ids: Sequence[int], bos_id: int, eos_id: int, max_length: int) -> list[int]:
    """bos + text truncated to max_length - 2 + eos: what truncation=True keeps for one sequence."""
    return [bos_id, *ids[: max_length - 2], eos_id]


def build_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], settings: TokenizerSettings
) -> Tokenizer:
    """The backend exactly as transformers 5's CLIPTokenizer configures it (post-processing aside)."""
    try:
        model = BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=settings.unk.content,
        )
    except Exception as error:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise EngineFolderError(f"tokenizer merges do not fit the vocabulary: {one_line(error)}") from error
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.add_special_tokens([token.added_token() for token in special_tokens_in_order(settings)])
    return tokenizer


def special_tokens_in_order(settings: TokenizerSettings) -> list[SpecialToken]:
    """Added tokens first, then named ones not among them; a later token with the same text wins."""
    listed = {token.content for token in settings.added}
    named = [settings.bos, settings.eos, settings.unk, settings.pad]
    return [*settings.added, *(token for token in named if token.content not in listed)]


def read_json(path: Path) -> Any:
    """A JSON file's content, or an EngineFolderError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineFolderError(f"missing tokenizer file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineFolderError(f"corrupt tokenizer file {path}: {one_line(error)}") from error


def read_vocab(path: Path) -> dict[str, int]:
    """vocab.json: token text to id, ids unique."""
    return check_vocab(read_json(path), str(path))


def check_vocab(vocab: Any, source: str) -> dict[str, int]:
    """A BPE vocabulary: a non-empty object of token text to unique non-negative integer ids."""
    if not isinstance(vocab, dict) or not vocab:
        raise EngineFolderError(f"corrupt tokenizer file {source}: expected a non-empty JSON object")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vocab.values()):
        raise EngineFolderError(f"corrupt tokenizer file {source}: ids must be non-negative integers")
    if len(set(vocab.values())) != len(vocab):
        raise EngineFolderError(f"corrupt tokenizer file {source}: duplicate ids")
    return vocab


def check_merges(vocab: dict[str, int], merges: list[tuple[str, str]], source: str, vocab_name: str) -> None:
    """Each merge's two parts and their join must be vocabulary tokens, as the `tokenizers` BPE demands."""
    for number, (left, right) in enumerate(merges, start=1):
        for token in (left, right, left + right):
            if token not in vocab:
                raise EngineFolderError(
                    f"tokenizer {source} does not fit {vocab_name}: merge {number} ({left} {right}) "
                    f"needs {token!r}, which is not in it"
                )


def read_vocab_and_merges(folder: Path) -> BpeFiles:
    """The older layout: vocab.json and merges.txt, both required."""
    vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
    for path in (vocab_path, merges_path):
        if not path.exists():
            raise EngineFolderError(
                f"missing tokenizer file: {path} (a tokenizer folder holds {TOKENIZER_JSON_FILE}, "
                f"or {VOCAB_FILE} and {MERGES_FILE})"
            )
    vocab = read_vocab(vocab_path)
    merges = read_merges(merges_path)
    check_merges(vocab, merges, str(merges_path), VOCAB_FILE)
    return BpeFiles(vocab, merges, (), str(vocab_path))


def read_tokenizer_json(path: Path) -> BpeFiles:
    """tokenizer.json's BPE "model" (vocab, merges) and "added_tokens", checked; nothing else is read.

    Merges are "left right" strings (tokenizers < 0.20) or [left, right] pairs (newer).
    """
    content = read_json(path)
    if not isinstance(content, dict):
        raise EngineFolderError(f"corrupt tokenizer file {path}: expected a JSON object")
    model = content.get("model")
    if not isinstance(model, dict):
        raise EngineFolderError(f'corrupt tokenizer file {path}: no "model" object')
    kind = model.get("type", "BPE")  # old files omit the type
    if kind != "BPE":
        raise EngineFolderError(f"tokenizer file {path} holds a {kind!r} model; CLIP's tokenizer is BPE")
    source = f"{path} (model.vocab)"
    vocab = check_vocab(model.get("vocab"), source)
    merges = parse_json_merges(model.get("merges"), path)
    check_merges(vocab, merges, str(path), "its model.vocab")
    added = parse_json_added_tokens(content.get("added_tokens", []), path)
    return BpeFiles(vocab, merges, added, source)


def parse_json_merges(value: Any, path: Path) -> list[tuple[str, str]]:
    """tokenizer.json's model.merges as (left, right) pairs, in priority order."""
    if not isinstance(value, list) or not value:
        raise EngineFolderError(f"corrupt tokenizer file {path}: model.merges is not a non-empty list")
    merges = []
    for number, merge in enumerate(value, start=1):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise EngineFolderError(f"corrupt tokenizer file {path}: merge {number} is not a pair of tokens")
        merges.append((parts[0], parts[1]))
    return merges


def parse_json_added_tokens(value: Any, path: Path) -> tuple[SpecialToken, ...]:
    """tokenizer.json's "added_tokens" ([{id, content, flags}]), in id order."""
    if not isinstance(value, list) or not all(
        isinstance(token, dict) and isinstance(token.get("id"), int) and not isinstance(token["id"], bool)
        for token in value
    ):
        raise EngineFolderError(
            f"corrupt tokenizer file {path}: added_tokens is not a list of tokens with ids"
        )
    ordered = sorted(value, key=lambda token: token["id"])
    return tuple(parse_special_token(token, path) for token in ordered)


def read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" header, then one "left right" pair a line, by priority."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise EngineFolderError(f"missing tokenizer file: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise EngineFolderError(f"corrupt tokenizer file {path}: {one_line(error)}") from error
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise EngineFolderError(f"corrupt tokenizer file {path}: line {number} is not a merge pair")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise EngineFolderError(f"corrupt tokenizer file {path}: no merges")
    return merges


def read_settings(folder: Path, json_added: tuple[SpecialToken, ...] = ()) -> TokenizerSettings:
    """Named special tokens, added tokens and length, resolved the way transformers 5 resolves them.

    A config with "added_tokens_decoder" is authoritative; otherwise (SD 1.5 / 2.1, and folders
    transformers 5 saved) named tokens come from tokenizer_config.json, overridden by
    special_tokens_map.json, and the added tokens are tokenizer.json's (``json_added``; none for
    vocab.json folders). A named token whose text is an added token takes that token's flags. Both
    files are optional.
    """
    config_path, map_path = folder / CONFIG_FILE, folder / SPECIAL_TOKENS_FILE
    config = read_optional_object(config_path)
    named = {key: (config[key], config_path) for key in SPECIAL_TOKEN_KEYS if config.get(key) is not None}
    added = json_added
    if "added_tokens_decoder" in config:
        added = parse_added_tokens(config["added_tokens_decoder"], config_path)
    else:
        special = read_optional_object(map_path)
        named.update(
            {key: (special[key], map_path) for key in SPECIAL_TOKEN_KEYS if special.get(key) is not None}
        )
    by_text = {token.content: token for token in added}
    defaults = TokenizerSettings()

    def token(key: str, default: SpecialToken) -> SpecialToken:
        if key not in named:
            return default
        parsed = parse_special_token(*named[key])
        return by_text.get(parsed.content, parsed)

    return TokenizerSettings(
        bos=token("bos_token", defaults.bos),
        eos=token("eos_token", defaults.eos),
        unk=token("unk_token", defaults.unk),
        pad=token("pad_token", defaults.pad),
        added=added,
        max_length=parse_max_length(config.get("model_max_length"), config_path),
    )


def read_optional_object(path: Path) -> dict[str, Any]:
    """A JSON object file that may be absent (then empty)."""
    if not path.exists():
        return {}
    content = read_json(path)
    if not isinstance(content, dict):
        raise EngineFolderError(f"corrupt tokenizer file {path}: expected a JSON object")
    return content


def parse_special_token(value: Any, source: Path) -> SpecialToken:
    """A token written as plain text (never normalized) or as an AddedToken dict (flags as given)."""
    if isinstance(value, str):
        return SpecialToken(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return SpecialToken(
            value["content"],
            normalized=bool(value.get("normalized", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            single_word=bool(value.get("single_word", False)),
        )
    raise EngineFolderError(f"corrupt tokenizer file {source}: a special token is neither text nor an object")


def parse_added_tokens(value: Any, source: Path) -> tuple[SpecialToken, ...]:
    """tokenizer_config.json's "added_tokens_decoder" ({id: token}), in id order."""
    if not isinstance(value, dict):
        raise EngineFolderError(f"corrupt tokenizer file {source}: added_tokens_decoder is not an object")
    try:
        ordered = sorted(value.items(), key=lambda item: int(item[0]))
    except ValueError:
        raise EngineFolderError(
            f"corrupt tokenizer file {source}: added_tokens_decoder has a non-integer id"
        ) from None
    return tuple(parse_special_token(token, source) for _, token in ordered)


def parse_max_length(value: Any, source: Path) -> int:
    """model_max_length, defaulting to CLIP's 77 when absent or transformers' "unlimited" sentinel."""
    if value is None:
        return DEFAULT_MAX_LENGTH
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != int(value) or value < 2:
        raise EngineFolderError(
            f"corrupt tokenizer file {source}: model_max_length {value!r} is not an integer >= 2"
        )
    return DEFAULT_MAX_LENGTH if value >= UNSET_MAX_LENGTH else int(value)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --- Converting OpenAI's BPE file (bpe_simple_vocab_16e6.txt.gz) into a tokenizer folder ---


def bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in for each byte 0..255, in vocabulary order (printable bytes first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(others))]
    return [chr(code) for code in codes]


def read_openai_bpe(
    path: str | os.PathLike[str], num_merges: int = 49152 - 256 - 2
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of OpenAI CLIP's gz file, built the way CLIP's SimpleTokenizer builds them.

    Line 1 is a header and lines 2..num_merges+1 the merges; the vocabulary is the 256 byte symbols,
    the same with "</w>", one token per merge, then <|startoftext|> and <|endoftext|>.
    """
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1 : num_merges + 1]
    pairs = [line.split() for line in lines]
    if len(pairs) != num_merges or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{path}: expected {num_merges} merge lines after the header")
    merges = [(left, right) for left, right in pairs]
    symbols = bytes_to_unicode()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer_folder(
    bpe_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    pad_token: str = EOS_TOKEN,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Path:
    """Write a diffusers-style tokenizer folder from OpenAI's BPE file, laid out like SD 1.5's / 2.1's.

    pad_token: "<|endoftext|>" as in SD 1.x, or "!" as in SD 2.x. Each file is written atomically.
    """
    vocab, merges = read_openai_bpe(bpe_path)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    merges_text = "\n".join([MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]) + "\n"
    write_atomic(folder / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False))
    write_atomic(folder / MERGES_FILE, merges_text)
    write_atomic(folder / CONFIG_FILE, json_text(tokenizer_config(pad_token, max_length)))
    write_atomic(folder / SPECIAL_TOKENS_FILE, json_text(special_tokens_map(pad_token)))
    return folder


BUNDLED_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bundled_bpe_path() -> Path:
    """OpenAI CLIP's BPE vocabulary shipped inside the package (engine/text/data/, MIT, see its README)."""
    return Path(__file__).resolve().parent / "data" / BUNDLED_BPE_FILE


def bundled_clip_tokenizer(pad_token: str = EOS_TOKEN, max_length: int = DEFAULT_MAX_LENGTH) -> ClipTokenizer:
    """The SD 1.x / 2.x tokenizer built from the bundled vocabulary, for models that ship no tokenizer.

    Identical to ClipTokenizer.from_folder on a folder write_tokenizer_folder wrote with the same
    pad_token ("<|endoftext|>" for SD 1.x, "!" for SD 2.x) and max_length; nothing is written to disk.
    Raises ValueError for a pad token outside the vocabulary.
    """
    source = bundled_bpe_path()
    vocab, merges = read_openai_bpe(source)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    # What read_settings makes of the folder: special_tokens_map.json overrides the named tokens.
    named = special_tokens_map(pad_token)
    settings = TokenizerSettings(
        bos=parse_special_token(named["bos_token"], source),
        eos=parse_special_token(named["eos_token"], source),
        unk=parse_special_token(named["unk_token"], source),
        pad=parse_special_token(named["pad_token"], source),
        max_length=max_length,
    )
    return ClipTokenizer(vocab, merges, settings)


def tokenizer_config(pad_token: str, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as SD 1.5 and 2.1 ship it."""
    return {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **added_token_fields(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added_token_fields(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **added_token_fields(EOS_TOKEN)},
    }


def special_tokens_map(pad_token: str) -> dict[str, Any]:
    """special_tokens_map.json as SD 1.5 and 2.1 ship it."""
    return {
        "bos_token": added_token_fields(BOS_TOKEN),
        "eos_token": added_token_fields(EOS_TOKEN),
        "pad_token": pad_token,
        "unk_token": added_token_fields(EOS_TOKEN),
    }


def added_token_fields(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def json_text(content: Any) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"
