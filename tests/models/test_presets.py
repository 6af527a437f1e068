"""Random-weight presets: SD-shaped configs, deterministic bytes, loadable by diffusers, finite outputs.

SDXL presets (tiny-xl, sdxl): tests/models/test_presets_xl.py."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import EngineError
from engine.models import presets
from engine.models.presets import Preset, clip_vocabulary, init_random, preset_spec
from tests.reference import two_steps_at_64

TINY = (Preset.TINY, Preset.TINY_V)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[Preset, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {preset: init_random(preset, root / preset.value, seed=0) for preset in TINY}


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from the safetensors headers without loading weights."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _parameter_count(folder: Path, prefix: str = "") -> int:
    shapes = _safetensors_shapes(folder).items()
    return sum(int(np.prod(shape)) for name, shape in shapes if name.startswith(prefix))


# --- folder layout and configs ----------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY)
def test_folder_layout(folders: dict[Preset, Path], preset: Preset) -> None:
    folder = folders[preset]
    index = _json(folder / "model_index.json")
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for name in COMPONENTS:
        assert (folder / name).is_dir(), name
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    tokenizer_files = {p.name for p in (folder / "tokenizer").iterdir()}
    assert tokenizer_files == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert not list(folder.parent.glob(".*")), "temporary folders left behind"


@pytest.mark.parametrize("preset", TINY)
def test_tiny_is_sd_shaped(folders: dict[Preset, Path], preset: Preset) -> None:
    folder = folders[preset]
    unet, vae = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    text = _json(folder / "text_encoder" / "config.json")
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert len(vae["block_out_channels"]) == 4 and vae["latent_channels"] == 4  # scale factor 8
    assert unet["sample_size"] * 8 == vae["sample_size"] == 64
    assert text["max_position_embeddings"] == 77
    sd2 = preset is Preset.TINY_V
    assert unet["use_linear_projection"] is sd2 and unet["upcast_attention"] is sd2
    scheduler = _json(folder / "scheduler" / "scheduler_config.json")
    assert scheduler["prediction_type"] == ("v_prediction" if sd2 else "epsilon")


@pytest.mark.parametrize("preset", list(Preset))
def test_text_encoder_ids_match_tokenizer(preset: Preset) -> None:
    spec = preset_spec(preset)
    encoders = spec.text_encoders()
    assert [name for name, _, _ in encoders] == ["text_encoder", "text_encoder_2"][: 1 + spec.is_xl]
    vocabularies = {size: clip_vocabulary(size)[0] for size in {tok.vocab_size for _, _, tok in encoders}}
    for name, _, tokenizer in encoders:
        vocab = vocabularies[tokenizer.vocab_size]
        config = presets.text_encoder_config(spec, name)
        assert config.vocab_size == len(vocab) == tokenizer.vocab_size
        assert config.bos_token_id == vocab["<|startoftext|>"]
        assert config.eos_token_id == vocab["<|endoftext|>"]
        assert config.pad_token_id == vocab[tokenizer.pad_token]


def test_sd_presets_mirror_the_real_configs() -> None:
    sd15, sd21 = preset_spec(Preset.SD15), preset_spec(Preset.SD21)
    assert sd15.unet.config()["attention_head_dim"] == 8 and sd15.unet.cross_attention_dim == 768
    assert sd21.unet.config()["attention_head_dim"] == [5, 10, 20, 20]
    assert (sd21.unet.cross_attention_dim, sd21.unet.sample_size, sd21.vae.sample_size) == (1024, 96, 768)
    assert sd21.unet.use_linear_projection and sd21.unet.upcast_attention
    te = sd21.text_encoder
    assert (te.hidden_size, te.num_hidden_layers, te.num_attention_heads, te.intermediate_size) == (
        1024,
        23,
        16,
        4096,
    )
    assert (te.hidden_act, te.projection_dim) == ("gelu", 512)
    assert (sd15.text_encoder.hidden_act, sd15.text_encoder.num_hidden_layers) == ("quick_gelu", 12)
    assert sd15.vae.config()["block_out_channels"] == (128, 256, 512, 512)
    assert sd15.scheduler.class_name == "PNDMScheduler" and sd21.scheduler.prediction_type == "v_prediction"
    assert sd15.tokenizer.vocab_size == sd21.tokenizer.vocab_size == 49408


# --- tokenizer -------------------------------------------------------------------------------


def test_clip_vocabulary_is_a_consistent_bpe() -> None:
    vocab, merges = clip_vocabulary(49408)
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (
        0,
        256,
        49406,
        49407,
    )
    assert len(merges) == 49408 - 512 - 2 and len(set(merges)) == len(merges)
    for rank, (left, right) in enumerate(merges):
        assert not left.endswith("</w>")
        assert vocab[left] < 512 + rank and vocab[right] < 512 + rank, "a merge uses a later token"
        assert vocab[left + right] == 512 + rank
    assert clip_vocabulary(1000)[1] == merges[: 1000 - 514]


@pytest.mark.parametrize("preset", TINY)
def test_tokenizer_loads_with_transformers(folders: dict[Preset, Path], preset: Preset) -> None:
    from transformers import CLIPTokenizer

    directory = folders[preset] / "tokenizer"
    from_files = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    from_folder = CLIPTokenizer.from_pretrained(directory)
    vocab_size = preset_spec(preset).tokenizer.vocab_size
    for prompt in ("a lighthouse at dusk", "Zürich, 4K — café ☕ 'quoted' x2", ""):
        ids = from_files(prompt).input_ids
        assert ids[0] == vocab_size - 2 and ids[-1] == vocab_size - 1
        assert all(0 <= i < vocab_size for i in ids)
    assert from_files.decode(from_files("a lighthouse at dusk").input_ids[1:-1]) == "a lighthouse at dusk"
    padded = from_folder("a lighthouse", padding="max_length", max_length=77).input_ids
    pad = 0 if preset is Preset.TINY_V else vocab_size - 1
    assert from_folder.model_max_length == 77 and from_folder.pad_token_id == pad
    assert len(padded) == 77 and padded[-1] == pad


# --- determinism -----------------------------------------------------------------------------


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_same_seed_same_bytes(folders: dict[Preset, Path], tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    again = init_random("tiny", tmp_path / "again", seed=0)
    other = init_random("tiny", tmp_path / "other", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global torch RNG changed"
    reference = _weights(folders[Preset.TINY])
    assert len(reference) == 3 and _weights(again) == reference
    assert (again / "tokenizer" / "merges.txt").read_bytes() == (
        folders[Preset.TINY] / "tokenizer" / "merges.txt"
    ).read_bytes()
    assert all(a != b for a, b in zip(_weights(other).values(), reference.values(), strict=True))


# --- diffusers loads and runs it ---------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY)
def test_stable_diffusion_pipeline_runs(folders: dict[Preset, Path], preset: Preset) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folders[preset])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.safety_checker is None
    expected = "DDIMScheduler" if preset is Preset.TINY_V else "PNDMScheduler"
    assert type(pipe.scheduler).__name__ == expected
    images = two_steps_at_64(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def _euler_latents(folder: Path, steps: int, latent_size: int) -> tuple[torch.Tensor, float]:
    """A classifier-free-guided Euler loop; returns the final latents and the largest UNet output."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer(["a lighthouse at dusk", ""], padding="max_length", max_length=77, return_tensors="pt")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    scheduler = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, latent_size, latent_size, generator=generator) * scheduler.init_noise_sigma
    largest = 0.0
    with torch.no_grad():
        embeddings = CLIPTextModel.from_pretrained(folder / "text_encoder")(ids.input_ids).last_hidden_state
        for t in scheduler.timesteps:
            cond, uncond = unet(
                scheduler.scale_model_input(latents.repeat(2, 1, 1, 1), t), t, embeddings
            ).sample
            guided = uncond + 7.5 * (cond - uncond)
            largest = max(largest, guided.abs().max().item())
            latents = scheduler.step(guided[None], t, latents).prev_sample
    return latents, largest


@pytest.mark.parametrize("preset", TINY)
def test_fifty_euler_steps_stay_finite(folders: dict[Preset, Path], preset: Preset) -> None:
    latents, largest = _euler_latents(folders[preset], steps=50, latent_size=8)
    assert torch.isfinite(latents).all() and largest < 100


# --- writing the folder ------------------------------------------------------------------------


def test_unknown_preset_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny, tiny-v, tiny-xl, sd15, sd21, sdxl"):
        init_random("sd99", tmp_path / "m")
    assert not any(tmp_path.iterdir())


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(presets, "_save_unet", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        init_random("tiny", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EngineError, match="not empty"):
        init_random("tiny", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    init_random("tiny", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    assert init_random(Preset.TINY_V, out) == out
    assert (out / "unet" / "config.json").is_file()


# --- SD-size presets (slow: ~30 s and ~4-5 GB on disk each) -------------------------------------


@pytest.fixture(scope="module")
def sd_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Preset, Path]]:
    root = tmp_path_factory.mktemp(request.param.value)
    yield request.param, init_random(request.param, root / "model", seed=0)
    shutil.rmtree(root)


# Parameter counts of the real SD 1.5 / SD 2.1 networks.
SD_COUNTS = {
    Preset.SD15: {"unet": 859_520_964, "text_encoder": 123_060_480},
    Preset.SD21: {"unet": 865_910_724, "text_encoder": 340_387_840},
}


@pytest.mark.slow
@pytest.mark.parametrize("sd_folder", [Preset.SD15, Preset.SD21], indirect=True, ids=["sd15", "sd21"])
def test_sd_parameter_counts(sd_folder: tuple[Preset, Path]) -> None:
    preset, folder = sd_folder
    for component, count in SD_COUNTS[preset].items():
        assert _parameter_count(folder / component) == count, component
    assert _parameter_count(folder / "vae", "decoder.") == 49_490_179
    assert _parameter_count(folder / "vae") == 83_653_863
    vocab = _json(folder / "tokenizer" / "vocab.json")
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    latents, largest = _euler_latents(folder, steps=3, latent_size=32)
    assert torch.isfinite(latents).all() and largest < 100
