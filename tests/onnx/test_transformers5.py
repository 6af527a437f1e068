"""Model folders written by today's diffusers / transformers 5 export and give diffusers' images.

transformers 5 saves the tokenizer as tokenizer.json (no vocab.json, merges.txt) and the text encoder's
weights without transformers 4's ``text_model.`` key prefix; folders in the wild have either prefix.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Pipeline
from engine.errors import ModelFolderError
from engine.export import ExportSettings, export_model
from engine.models.folder import inspect_model_folder
from engine.models.torch_modules import load_source_model
from engine.specs import Network
from engine.text.tokenizer import ClipTokenizer
from tests.engine_reuse import export_reusing
from tests.models.test_folder import (
    T5_TOKENIZER_FILES,
    prefix_text_encoder_keys,
    resave_with_diffusers,
    save_tokenizer_like_transformers5,
)
from tests.reference import diffusers_pipeline, generators, psnr

PROMPT = "wow! a lighthouse at dusk, oil painting!!"
NEGATIVE = "blurry, low quality"
NETWORKS = ExportSettings(networks=(Network.TEXT_ENCODER, Network.UNET, Network.VAE_DECODER))


def assert_same_image_as_diffusers(engine: Path, model: Path, sampler: str, seed: int) -> None:
    ours = Pipeline.load(engine).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=6, width=64, height=64, sampler=sampler, seed=seed
    )
    ref = diffusers_pipeline(model, sampler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, width=64, height=64,
        generator=generators(seed, 1), output_type="np",
    ).images  # fmt: skip
    assert psnr(ours.images[0], ref[0]) >= 40


def sd2_t5_model(tiny_v_model: Path, target: Path) -> Path:
    """SD 2 style ("!" padding, v-prediction) with a transformers 5 tokenizer and prefixed text keys."""
    model = Path(shutil.copytree(tiny_v_model, target))
    save_tokenizer_like_transformers5(model / "tokenizer")
    prefix_text_encoder_keys(model)
    return model


@pytest.fixture(scope="module")
def t5_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resave_with_diffusers(tiny_model, tmp_path_factory.mktemp("t5") / "model")


@pytest.fixture(scope="module")
def t5_engine(
    t5_model: Path, tiny_model: Path, tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The saved folder exported: its text encoder (transformers 5 key names) and tokenizer.json for
    real; its UNet and VAE, diffusers' re-save of tiny_model's (checked bit for bit), are the session
    engine's graphs, so CI pays for no second tiny UNet export (most of a minute on 2 cores)."""
    engine = tmp_path_factory.mktemp("t5") / "engine"
    reuse = (Network.UNET, Network.VAE_DECODER)
    return export_reusing(t5_model, engine, tiny_model, tiny_engine, reuse).engine_dir


def test_transformers_5_folder_exports_and_matches_diffusers(
    t5_model: Path, t5_engine: Path, rng: np.random.Generator
) -> None:
    """The folder `pipe.save_pretrained` writes today: the engine carries its tokenizer.json as is."""
    assert sorted(path.name for path in (t5_engine / "tokenizer").iterdir()) == T5_TOKENIZER_FILES
    assert_same_image_as_diffusers(t5_engine, t5_model, "Euler a", seed=int(rng.integers(2**31)))


def test_engine_tokenizer_gives_the_ids_of_the_original_folder(
    tiny_model: Path, t5_model: Path, t5_engine: Path
) -> None:
    from transformers import CLIPTokenizer

    prompts = [PROMPT, NEGATIVE, "", "a photo of an ASTRONAUT riding a horse, 8k " * 10]
    engine = ClipTokenizer.from_folder(t5_engine / "tokenizer")
    reference = CLIPTokenizer.from_pretrained(str(t5_model / "tokenizer"))
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(engine.encode(prompts), expected.input_ids)
    np.testing.assert_array_equal(
        engine.encode(prompts), ClipTokenizer.from_folder(tiny_model / "tokenizer").encode(prompts)
    )


def test_text_model_prefix_loads_the_same_weights(t5_model: Path, tmp_path: Path) -> None:
    """transformers 4 style keys (``text_model.``) and transformers 5 style keys give one network, and
    the one diffusers loads."""
    import diffusers

    prefixed = Path(shutil.copytree(t5_model, tmp_path / "prefixed"))
    prefix_text_encoder_keys(prefixed)
    ours = load_source_model(inspect_model_folder(prefixed)).text_encoder.state_dict()
    plain = load_source_model(inspect_model_folder(t5_model)).text_encoder.state_dict()
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        prefixed, safety_checker=None, requires_safety_checker=False
    ).text_encoder.state_dict()
    assert ours.keys() == plain.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, plain[name]) and torch.equal(value, theirs[name]), name


def rewrite_text_encoder(model: Path, edit: str) -> None:
    from safetensors.torch import load_file, save_file

    path = model / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    if edit == "wrong shape":
        name = "text_model.encoder.layers.0.mlp.fc1.weight"
        tensors[name] = tensors[name][:-1]
    elif edit == "missing":
        del tensors["text_model.final_layer_norm.weight"]
    elif edit == "both spellings":
        tensors["final_layer_norm.bias"] = tensors["text_model.final_layer_norm.bias"].clone()
    save_file(tensors, path, {"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("wrong shape", "text_encoder: config/weights mismatch for 'encoder.layers.0.mlp.fc1.weight'"),
        (
            "missing",
            "text_encoder: model.safetensors lacks 1 weights of its config, e.g. 'final_layer_norm.weight'",
        ),
        ("both spellings", "holds 'final_layer_norm.bias' both with and without the 'text_model.' prefix"),
    ],
)
def test_prefixed_weights_are_still_checked_against_the_config(
    t5_model: Path, tmp_path: Path, edit: str, message: str
) -> None:
    model = Path(shutil.copytree(t5_model, tmp_path / "prefixed"))
    prefix_text_encoder_keys(model)
    rewrite_text_encoder(model, edit)
    with pytest.raises(ModelFolderError, match=re.escape(message)):
        load_source_model(inspect_model_folder(model))


def test_sd2_engine_runs_a_transformers_5_tokenizer(
    tiny_v_model: Path, tiny_v_engine: Path, tmp_path: Path
) -> None:
    """The runtime reads tokenizer.json too: SD 2's "!" padding, matched inside the prompt as well."""
    model = Path(shutil.copytree(tiny_v_model, tmp_path / "model"))
    save_tokenizer_like_transformers5(model / "tokenizer")
    engine = Path(shutil.copytree(tiny_v_engine, tmp_path / "engine"))
    shutil.rmtree(engine / "tokenizer")
    shutil.copytree(model / "tokenizer", engine / "tokenizer")
    tokenizer = ClipTokenizer.from_folder(engine / "tokenizer")
    assert tokenizer.pad_id == 0 and tokenizer.encode_unpadded("wow!")[-1] == 0
    assert_same_image_as_diffusers(engine, model, "DDIM", seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_model_prefixed_folder_exports_and_matches_diffusers(
    family: str, t5_model: Path, tiny_v_model: Path, tmp_path: Path
) -> None:
    """A full export per folder (about a minute each on 2 cores): transformers 4 key names with a
    transformers 5 tokenizer, SD 1 style (saved by diffusers) and SD 2 style (built by hand)."""
    if family == "sd1":
        model = Path(shutil.copytree(t5_model, tmp_path / "model"))
        prefix_text_encoder_keys(model)
    else:
        model = sd2_t5_model(tiny_v_model, tmp_path / "model")
    engine = export_model(model, tmp_path / "engine", NETWORKS).engine_dir
    assert sorted(path.name for path in (engine / "tokenizer").iterdir()) == T5_TOKENIZER_FILES
    assert_same_image_as_diffusers(engine, model, "DPM++ 2M", seed=3)
