"""engine.models.folder: diffusers folders in both tokenizer layouts, and one-line errors for the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ModelFolderError
from engine.models.folder import inspect_model_folder

T5_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
OLD_TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def resave_with_diffusers(model: Path, target: Path) -> Path:
    """The model as today's diffusers and transformers 5 save it: ``pipe.save_pretrained``.

    transformers 5 writes the tokenizer as tokenizer.json + tokenizer_config.json (no vocab.json,
    merges.txt) and the text encoder's weights without the ``text_model.`` key prefix.
    """
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False
    )
    pipe.save_pretrained(target)
    assert sorted(path.name for path in (target / "tokenizer").iterdir()) == T5_TOKENIZER_FILES
    return target


def save_tokenizer_like_transformers5(tokenizer_dir: Path) -> None:
    """Replace a vocab.json + merges.txt tokenizer folder by transformers 5's save of the same tokenizer,
    built from the two files (positional: transformers 5 ignores ``vocab_file=``)."""
    from transformers import CLIPTokenizer

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"),
        str(tokenizer_dir / "merges.txt"),
        pad_token=config["pad_token"],
        model_max_length=config["model_max_length"],
    )
    shutil.rmtree(tokenizer_dir)
    tokenizer.save_pretrained(str(tokenizer_dir))
    assert sorted(path.name for path in tokenizer_dir.iterdir()) == T5_TOKENIZER_FILES


def prefix_text_encoder_keys(model: Path) -> None:
    """Rewrite text_encoder/model.safetensors with transformers 4's ``text_model.`` key prefix."""
    from safetensors.torch import load_file, save_file

    path = model / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    assert not any(name.startswith("text_model.") for name in tensors)
    save_file({f"text_model.{name}": value for name, value in tensors.items()}, path, {"format": "pt"})


@pytest.fixture(scope="module")
def t5_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resave_with_diffusers(tiny_model, tmp_path_factory.mktemp("t5") / "model")


@pytest.fixture
def t5_copy(t5_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(t5_model, tmp_path / "model"))


def test_folder_saved_by_transformers_5_is_accepted(t5_model: Path) -> None:
    folder = inspect_model_folder(t5_model)
    assert folder.family == "sd1" and folder.weights["text_encoder"].path.name == "model.safetensors"


def test_both_tokenizer_layouts_are_accepted(tiny_model: Path, t5_copy: Path) -> None:
    tokenizer = t5_copy / "tokenizer"
    for name in OLD_TOKENIZER_FILES:  # both layouts side by side
        shutil.copy(tiny_model / "tokenizer" / name, tokenizer / name)
    inspect_model_folder(t5_copy)
    (tokenizer / "tokenizer.json").unlink()  # vocab.json + merges.txt alone: older folders
    inspect_model_folder(t5_copy)


@pytest.mark.parametrize(
    ("keep", "missing"),
    [
        ([], "missing vocab.json, merges.txt"),
        (["vocab.json"], "missing merges.txt"),
        (["merges.txt"], "missing vocab.json"),
    ],
)
def test_tokenizer_without_either_layout_is_one_line(
    tiny_model: Path, t5_copy: Path, keep: list[str], missing: str
) -> None:
    tokenizer = t5_copy / "tokenizer"
    (tokenizer / "tokenizer.json").unlink()
    for name in keep:
        shutil.copy(tiny_model / "tokenizer" / name, tokenizer / name)
    with pytest.raises(ModelFolderError) as caught:
        inspect_model_folder(t5_copy)
    message = str(caught.value)
    assert message == (
        f"tokenizer: {tokenizer} has neither tokenizer.json nor vocab.json + merges.txt ({missing})"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model": {"type": "BPE", "vocab": {', "corrupt tokenizer file"),
        ('{"model": {"type": "Unigram", "vocab": []}}', "holds a 'Unigram' model"),
        ('{"added_tokens": []}', 'no "model" object'),
    ],
)
def test_broken_tokenizer_json_is_one_line_naming_it(t5_copy: Path, content: str, message: str) -> None:
    path = t5_copy / "tokenizer" / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ModelFolderError, match=message) as caught:
        inspect_model_folder(t5_copy)
    text = str(caught.value)
    assert text.startswith("tokenizer: ") and str(path) in text and "\n" not in text


def test_tokenizer_with_more_ids_than_the_text_encoder_embeds_is_refused(t5_copy: Path) -> None:
    """A tokenizer from another model (here: one textual-inversion token too many) would index past
    the embedding table at generation time; the folder is refused instead."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(t5_copy / "tokenizer"))
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(str(t5_copy / "tokenizer"))
    with pytest.raises(ModelFolderError) as caught:
        inspect_model_folder(t5_copy)
    assert str(caught.value) == (
        f"tokenizer: {t5_copy / 'tokenizer'} has 1001 token ids, but the text encoder embeds only 1000 "
        "(vocab_size in text_encoder/config.json)"
    )
