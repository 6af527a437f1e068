"""engine.text.tokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineFolderError
from engine.text.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    SD2_PAD_TOKEN,
    ClipTokenizer,
    bundled_bpe_path,
    bundled_clip_tokenizer,
    write_tokenizer_folder,
)
from tests.conftest import PARTI_PROMPTS

transformers = pytest.importorskip("transformers")

BPE_FILE = bundled_bpe_path()  # engine/text/data, shipped with the package

EDGE_CASES = [
    "",
    " ",
    "   \t\n  ",
    "a photo of a cat",
    "A Photo OF a CAT",
    "café naïve résumé Ångström",
    "e\u0301 vs \u00e9 (NFD vs NFC)",
    "ＡＢＣ full-width, ﬁ ligature, ² superscript",
    "猫の写真, 한국어, 中文提示词",
    "😀👍🏽 🏳️‍🌈 emoji",
    "tabs\tand\nnewlines\r\nand\u3000ideographic\u00a0spaces",
    "\u200b\ufeffzero width",
    "It's I'LL we'd they've",
    "1234 3.14 x1y2 2024-01-01",
    "hello! world!!! ! !!",
    "a!b ?!",
    "<|endoftext|> x <|ENDOFTEXT|> <|startoftext|> <|StartOfText|>",
    "<|endoftext|>!",
    "word " * 100,
    "A" * 500,
    ", ".join(["masterpiece", "best quality", "ultra-detailed", "8k"] * 20),
]


def parti_prompts() -> list[str]:
    with PARTI_PROMPTS.open(encoding="utf-8", newline="") as handle:
        return [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizer folders in the layouts real SD models ship (SD 1.5, SD 2.1) and newer/older ones."""
    root = tmp_path_factory.mktemp("tokenizers")
    sd1 = write_tokenizer_folder(BPE_FILE, root / "sd1")
    sd2 = write_tokenizer_folder(BPE_FILE, root / "sd2", pad_token=SD2_PAD_TOKEN)
    result = {"sd1": sd1, "sd2": sd2}
    for name, source in [("sd1_added_tokens", sd1), ("sd2_added_tokens", sd2)]:
        result[name] = with_added_tokens_decoder(source, root / name)
    bare = root / "bare"  # vocab + merges only: every setting from the defaults
    bare.mkdir()
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(sd1 / file, bare / file)
    result["bare"] = bare
    # As transformers 5 saves them (tokenizer.json + tokenizer_config.json): re-saved SD folders, and
    # tokenizers built from the two files (positional: transformers 5 ignores vocab_file=).
    for name, source in [("sd1", sd1), ("sd2", sd2)]:
        result[f"{name}_t5"] = saved_by_transformers(
            transformers.CLIPTokenizer.from_pretrained(str(source)), root / f"{name}_t5"
        )
    for name, pad in [("sd1", EOS_TOKEN), ("sd2", SD2_PAD_TOKEN)]:
        built = transformers.CLIPTokenizer(str(sd1 / "vocab.json"), str(sd1 / "merges.txt"), pad_token=pad)
        result[f"{name}_t5_built"] = saved_by_transformers(built, root / f"{name}_t5_built")
    return result


T5_FILES = ["tokenizer.json", "tokenizer_config.json"]


def saved_by_transformers(tokenizer: object, target: Path) -> Path:
    tokenizer.save_pretrained(str(target))
    assert sorted(path.name for path in target.iterdir()) == T5_FILES
    return target


def with_added_tokens_decoder(source: Path, target: Path) -> Path:
    """The same folder as transformers >= 4.34 saves it: an authoritative added_tokens_decoder."""
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {
        "49406": {"content": BOS_TOKEN, "normalized": True, **flags},
        "49407": {"content": EOS_TOKEN, "normalized": False, **flags},
    }
    if config["pad_token"] == SD2_PAD_TOKEN:
        config["added_tokens_decoder"]["0"] = {"content": SD2_PAD_TOKEN, "normalized": False, **flags}
    for key in ("bos_token", "eos_token", "unk_token"):
        config[key] = config[key]["content"]
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


def reference_ids(tokenizer: object, prompts: list[str]) -> np.ndarray:
    return tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids


VARIANTS = ["sd1", "sd2", "sd1_added_tokens", "sd2_added_tokens", "bare"]
T5_VARIANTS = ["sd1_t5", "sd2_t5", "sd1_t5_built", "sd2_t5_built"]


@pytest.mark.parametrize("variant", VARIANTS + T5_VARIANTS)
def test_every_partiprompt_and_edge_case_matches_transformers(folders: dict[str, Path], variant: str) -> None:
    prompts = parti_prompts() + EDGE_CASES
    assert len(prompts) == 1632 + len(EDGE_CASES)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folders[variant]))
    ours = ClipTokenizer.from_folder(folders[variant])
    expected = reference_ids(reference, prompts)
    got = ours.encode(prompts)
    assert got.dtype == np.int64 and got.shape == (len(prompts), 77)
    mismatched = [prompts[i] for i in np.flatnonzero((got != expected).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]}"
    assert ours.pad_id == reference.pad_token_id


def test_matches_clip_tokenizer_built_from_vocab_and_merges(folders: dict[str, Path]) -> None:
    # transformers 5 takes the two paths positionally (vocab_file= is silently ignored).
    folder = folders["bare"]
    reference = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    prompts = parti_prompts()[::7] + EDGE_CASES
    np.testing.assert_array_equal(
        ClipTokenizer.from_folder(folder).encode(prompts), reference_ids(reference, prompts)
    )


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sd1_t5", "sd2_t5"])
def test_unpadded_ids_match_transformers_without_special_tokens(
    folders: dict[str, Path], variant: str
) -> None:
    reference = transformers.CLIPTokenizer.from_pretrained(str(folders[variant]))
    ours = ClipTokenizer.from_folder(folders[variant])
    for prompt in parti_prompts()[::11] + EDGE_CASES:
        assert ours.encode_unpadded(prompt) == reference(prompt, add_special_tokens=False).input_ids, prompt


@pytest.mark.parametrize("variant", ["sd1_t5", "sd2_t5"])
def test_auto_tokenizer_loads_the_same_ids_from_a_transformers_5_folder(
    folders: dict[str, Path], variant: str
) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(str(folders[variant]))
    assert type(reference).__name__ == "CLIPTokenizer"
    prompts = parti_prompts()[::13] + EDGE_CASES
    np.testing.assert_array_equal(
        ClipTokenizer.from_folder(folders[variant]).encode(prompts), reference_ids(reference, prompts)
    )


def test_tokenizer_json_wins_over_vocab_and_merges_like_transformers_5(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Both layouts in one folder: transformers 5 reads tokenizer.json, so do we (merges.txt is cut
    short here, which would change the ids if it were read)."""
    folder = shutil.copytree(folders["sd1_t5"], tmp_path / "both")
    shutil.copy(folders["sd1"] / "vocab.json", folder / "vocab.json")
    merges = (folders["sd1"] / "merges.txt").read_text(encoding="utf-8").splitlines()[:2001]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    prompts = parti_prompts()[::17] + EDGE_CASES
    reference = reference_ids(transformers.CLIPTokenizer.from_pretrained(str(folder)), prompts)
    np.testing.assert_array_equal(ClipTokenizer.from_folder(folder).encode(prompts), reference)
    (folder / "tokenizer.json").unlink()
    assert (ClipTokenizer.from_folder(folder).encode(prompts) != reference).any()


def test_added_tokens_in_tokenizer_json_match_transformers(folders: dict[str, Path], tmp_path: Path) -> None:
    """Textual-inversion style tokens beyond the vocabulary, saved by transformers 5's add_tokens."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folders["sd1"]))
    assert tokenizer.add_tokens(["<cat-toy>", "sks dog"]) == 2
    folder = saved_by_transformers(tokenizer, tmp_path / "ti")
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ours = ClipTokenizer.from_folder(folder)
    prompts = ["a <cat-toy> on A <CAT-TOY>, sks dog", "<cat-toy><cat-toy>!", *parti_prompts()[::29]]
    np.testing.assert_array_equal(ours.encode(prompts), reference_ids(reference, prompts))
    assert ours.encode_unpadded(prompts[0]) == [320, 49408, 525, 320, 49408, 267, 49409]
    assert ours.vocab_size == len(reference) == 49410


def test_merges_as_strings_read_like_pairs(folders: dict[str, Path], tmp_path: Path) -> None:
    """tokenizers < 0.20 wrote each merge as one "left right" string."""
    folder = shutil.copytree(folders["sd2_t5"], tmp_path / "old_merges")
    content = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    content["model"]["merges"] = [" ".join(pair) for pair in content["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(content), encoding="utf-8")
    prompts = parti_prompts()[::19] + EDGE_CASES
    np.testing.assert_array_equal(
        ClipTokenizer.from_folder(folder).encode(prompts),
        ClipTokenizer.from_folder(folders["sd2_t5"]).encode(prompts),
    )


def test_converted_vocabulary_gives_the_known_ids(folders: dict[str, Path]) -> None:
    tokenizer = ClipTokenizer.from_folder(folders["sd1"])
    assert tokenizer.encode(["a photo of a cat"])[0, :8].tolist() == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
        49407,
    ]
    assert (tokenizer.max_length, tokenizer.bos_id, tokenizer.eos_id) == (77, 49406, 49407)
    assert tokenizer.vocab_size == 49408
    merges = (folders["sd1"] / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 48895 and merges[-1] == "jeky ll</w>"


def test_long_prompt_keeps_first_75_tokens_between_bos_and_eos(folders: dict[str, Path]) -> None:
    tokenizer = ClipTokenizer.from_folder(folders["sd1"])
    prompt = " ".join(f"word{i}" for i in range(60))
    text_ids = tokenizer.encode_unpadded(prompt)
    assert len(text_ids) > 75
    row = tokenizer.encode([prompt])[0]
    assert row[0] == tokenizer.bos_id and row[76] == tokenizer.eos_id
    assert row[1:76].tolist() == text_ids[:75]


@pytest.mark.parametrize("suffix", ["", "_t5"])
def test_sd1_pads_with_end_of_text_and_sd2_with_exclamation_mark(
    folders: dict[str, Path], suffix: str
) -> None:
    sd1 = ClipTokenizer.from_folder(folders["sd1" + suffix])
    sd2 = ClipTokenizer.from_folder(folders["sd2" + suffix])
    assert (sd1.pad_id, sd2.pad_id) == (49407, 0)
    row1, row2 = sd1.encode(["a cat"])[0], sd2.encode(["a cat"])[0]
    assert row1[:4].tolist() == row2[:4].tolist() == [49406, 320, 2368, 49407]
    assert set(row1[4:].tolist()) == {49407} and set(row2[4:].tolist()) == {0}


@pytest.mark.parametrize("suffix", ["", "_t5", "_t5_built"])
def test_sd2_pad_token_is_matched_inside_the_prompt_like_transformers(
    folders: dict[str, Path], suffix: str
) -> None:
    # SD 2's "!" is a special (added) token, so "wow!" ends in id 0, not in "!</w>" (256) as in SD 1.
    assert ClipTokenizer.from_folder(folders["sd1" + suffix]).encode_unpadded("wow!") == [2781, 256]
    assert ClipTokenizer.from_folder(folders["sd2" + suffix]).encode_unpadded("wow!") == [2781, 0]


def test_empty_batch_and_single_string(folders: dict[str, Path]) -> None:
    tokenizer = ClipTokenizer.from_folder(folders["sd1"])
    assert tokenizer.encode([]).shape == (0, 77)
    with pytest.raises(TypeError, match="sequence of strings"):
        tokenizer.encode("a cat")  # type: ignore[arg-type]


def test_folder_sets_max_length(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(folders["sd1"], tmp_path / "short")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 16
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    prompt = "a very long prompt " * 10
    expected = reference([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ClipTokenizer.from_folder(folder).encode([prompt]), expected.input_ids)


def test_writing_is_atomic_and_repeatable(folders: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "tok"
    write_tokenizer_folder(BPE_FILE, target)
    write_tokenizer_folder(BPE_FILE, target)  # over an existing folder
    names = sorted(path.name for path in target.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    for name in names:
        assert (target / name).read_bytes() == (folders["sd1"] / name).read_bytes()


def break_file(folder: Path, name: str, content: str | None) -> None:
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_text(content, encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vocab.json", None, "missing tokenizer file"),
        ("merges.txt", None, "missing tokenizer file"),
        ("vocab.json", '{"a": 0,', "corrupt tokenizer file"),
        ("vocab.json", "[1, 2]", "corrupt tokenizer file"),
        ("vocab.json", '{"a": 0, "b": 0}', "duplicate ids"),
        ("merges.txt", "#version: 0.2\na b c\n", "line 2 is not a merge pair"),
        ("merges.txt", "#version: 0.2\nqq zz\n", "does not fit vocab.json: merge 1"),
        ("tokenizer_config.json", "{not json", "corrupt tokenizer file"),
        ("special_tokens_map.json", '{"pad_token": "<|nope|>"}', r"'<\|nope\|>' is not in .*vocab\.json"),
        ("tokenizer_config.json", '{"model_max_length": "77"}', "model_max_length"),
        ("tokenizer_config.json", '{"model_max_length": 1}', "model_max_length"),
        ("special_tokens_map.json", '{"pad_token": 5}', "neither text nor an object"),
    ],
)
def test_broken_folder_raises_one_line_error_naming_the_file(
    folders: dict[str, Path], tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    folder = shutil.copytree(folders["sd1"], tmp_path / "broken")
    break_file(folder, name, content)
    with pytest.raises(EngineFolderError, match=message) as caught:
        ClipTokenizer.from_folder(folder)
    text = str(caught.value)
    assert "\n" not in text
    assert name in text or "<|nope|>" in text  # an unknown token names vocab.json, checked above


def edit_tokenizer_json(folder: Path, edit: str) -> None:
    """One way to break a transformers 5 tokenizer.json (see the parametrization below)."""
    path = folder / "tokenizer.json"
    if edit == "not json":
        path.write_text('{"model": ', encoding="utf-8")
        return
    content = json.loads(path.read_text(encoding="utf-8"))
    model = content["model"]
    if edit == "list":
        content = [content]
    elif edit == "no model":
        del content["model"]
    elif edit == "wordpiece":
        model["type"] = "WordPiece"
    elif edit == "vocab list":
        model["vocab"] = list(model["vocab"])
    elif edit == "duplicate id":
        model["vocab"]["zzzz"] = 5
    elif edit == "no merges":
        model["merges"] = []
    elif edit == "triple merge":
        model["merges"][3] = ["a", "b", "c"]
    elif edit == "merge outside vocab":
        model["merges"][7] = ["<nope>", "zz"]
    elif edit == "added not list":
        content["added_tokens"] = {"49406": "<|startoftext|>"}
    elif edit == "added without id":
        del content["added_tokens"][0]["id"]
    elif edit == "pad outside vocab":
        model["vocab"] = {k: v for k, v in model["vocab"].items() if k != EOS_TOKEN}
        model["merges"] = model["merges"][:100]
        content["added_tokens"] = []
    path.write_text(json.dumps(content), encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("not json", "corrupt tokenizer file"),
        ("list", "expected a JSON object"),
        ("no model", 'no "model" object'),
        ("wordpiece", "holds a 'WordPiece' model; CLIP's tokenizer is BPE"),
        ("vocab list", "expected a non-empty JSON object"),
        ("duplicate id", "duplicate ids"),
        ("no merges", "model.merges is not a non-empty list"),
        ("triple merge", "merge 4 is not a pair of tokens"),
        ("merge outside vocab", r"does not fit its model\.vocab: merge 8 \(<nope> zz\) needs '<nope>'"),
        ("added not list", "added_tokens is not a list of tokens with ids"),
        ("added without id", "added_tokens is not a list of tokens with ids"),
        ("pad outside vocab", r"'<\|endoftext\|>' is not in .*tokenizer\.json \(model\.vocab\)"),
    ],
)
def test_broken_tokenizer_json_raises_one_line_error_naming_it(
    folders: dict[str, Path], tmp_path: Path, edit: str, message: str
) -> None:
    folder = shutil.copytree(folders["sd1_t5"], tmp_path / "broken")
    shutil.copy(folders["sd1"] / "vocab.json", folder / "vocab.json")  # never a silent fallback to these
    shutil.copy(folders["sd1"] / "merges.txt", folder / "merges.txt")
    edit_tokenizer_json(folder, edit)
    with pytest.raises(EngineFolderError, match=message) as caught:
        ClipTokenizer.from_folder(folder)
    assert "\n" not in str(caught.value) and str(folder / "tokenizer.json") in str(caught.value)


def test_folder_without_either_layout_names_both(tmp_path: Path) -> None:
    folder = tmp_path / "configs_only"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(EngineFolderError, match="missing tokenizer file") as caught:
        ClipTokenizer.from_folder(folder)
    assert all(name in str(caught.value) for name in ("tokenizer.json", "vocab.json", "merges.txt"))


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(EngineFolderError, match="tokenizer folder not found"):
        ClipTokenizer.from_folder(tmp_path / "absent")


@pytest.mark.parametrize(("variant", "pad_token"), [("sd1", EOS_TOKEN), ("sd2", SD2_PAD_TOKEN)])
def test_bundled_tokenizer_equals_the_written_folder(
    folders: dict[str, Path], variant: str, pad_token: str
) -> None:
    """Single-file checkpoints ship no tokenizer: the bundled vocabulary stands in, byte for byte."""
    prompts = parti_prompts()[::5] + EDGE_CASES
    bundled = bundled_clip_tokenizer(pad_token)
    from_folder = ClipTokenizer.from_folder(folders[variant])
    np.testing.assert_array_equal(bundled.encode(prompts), from_folder.encode(prompts))
    assert [bundled.encode_unpadded(p) for p in EDGE_CASES] == [
        from_folder.encode_unpadded(p) for p in EDGE_CASES
    ]
    assert (bundled.pad_id, bundled.max_length, bundled.vocab_size) == (
        from_folder.pad_id,
        from_folder.max_length,
        from_folder.vocab_size,
    )


def test_bundled_vocabulary_ships_inside_the_package_with_its_licence() -> None:
    import engine

    package = Path(engine.__file__).resolve().parent
    assert BPE_FILE.is_file() and BPE_FILE.is_relative_to(package)
    assert (BPE_FILE.parent / "LICENSE").read_text(encoding="utf-8").startswith("Copyright (c)")
    assert bundled_clip_tokenizer(max_length=16).encode(["a photo of a cat"]).shape == (1, 16)
    with pytest.raises(ValueError, match="pad token '<pad>' is not in the vocabulary"):
        bundled_clip_tokenizer("<pad>")
