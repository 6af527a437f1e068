"""SDXL presets: tiny-xl loads and runs in diffusers' SDXL pipelines, sdxl is SDXL base 1.0's architecture."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.models import presets
from engine.models.presets import Preset, init_random, preset_spec
from tests.reference import two_steps_at_64

XL_FOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")
TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_random(Preset.TINY_XL, tmp_path_factory.mktemp("presets-xl") / "tiny-xl", seed=0)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


# --- folder layout and configs ----------------------------------------------------------------


def test_folder_layout(tiny_xl: Path) -> None:
    index = _json(tiny_xl / "model_index.json")
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True and index["add_watermarker"] is False
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert "safety_checker" not in index
    assert sorted(p.name for p in tiny_xl.iterdir() if p.is_dir()) == list(XL_FOLDERS)
    assert sorted(_weights(tiny_xl)) == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    for name in ("tokenizer", "tokenizer_2"):
        assert {p.name for p in (tiny_xl / name).iterdir()} == TOKENIZER_FILES
    assert _json(tiny_xl / "tokenizer" / "special_tokens_map.json")["pad_token"] == "<|endoftext|>"
    assert _json(tiny_xl / "tokenizer_2" / "special_tokens_map.json")["pad_token"] == "!"
    assert not list(tiny_xl.parent.glob(".*")), "temporary folders left behind"


def test_tiny_xl_is_sdxl_shaped(tiny_xl: Path) -> None:
    unet, vae = _json(tiny_xl / "unet" / "config.json"), _json(tiny_xl / "vae" / "config.json")
    text, text_2 = (_json(tiny_xl / name / "config.json") for name in ("text_encoder", "text_encoder_2"))
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["transformer_layers_per_block"] == [1, 1, 2] and unet["use_linear_projection"] is True
    assert unet["cross_attention_dim"] == text["hidden_size"] + text_2["hidden_size"]
    assert unet["addition_embed_type"] == "text_time"
    time_ids_width = 6 * unet["addition_time_embed_dim"]  # original size, crop top-left, target size
    assert unet["projection_class_embeddings_input_dim"] == time_ids_width + text_2["projection_dim"]
    widths = {text["hidden_size"], text_2["hidden_size"], text_2["projection_dim"]}
    widths |= {unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"]}
    assert len(widths) == 5, "widths coincide: a mixed-up shape would go unnoticed"
    assert (text["hidden_act"], text_2["hidden_act"]) == ("quick_gelu", "gelu")
    assert text_2["num_hidden_layers"] >= 3 and text["max_position_embeddings"] == 77
    assert len(vae["block_out_channels"]) == 4 and vae["latent_channels"] == 4  # scale factor 8
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)
    assert unet["sample_size"] * 8 == vae["sample_size"] == 64
    scheduler = _json(tiny_xl / "scheduler" / "scheduler_config.json")
    assert {key: scheduler[key] for key in SDXL_SCHEDULER} == SDXL_SCHEDULER


# stabilityai/stable-diffusion-xl-base-1.0: scheduler/scheduler_config.json and the graph-shaping
# fields of unet/, text_encoder/, text_encoder_2/ and vae/config.json.
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": (320, 640, 1280),
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
}
SDXL_TEXT = {  # (hidden, layers, heads, intermediate, activation, projection)
    "text_encoder": (768, 12, 12, 3072, "quick_gelu", 768),
    "text_encoder_2": (1280, 32, 20, 5120, "gelu", 1280),
}
SDXL_VAE = {"block_out_channels": (128, 256, 512, 512), "sample_size": 1024, "scaling_factor": 0.13025}


def test_sdxl_mirrors_base_1_0() -> None:
    spec = preset_spec(Preset.SDXL)
    unet = spec.unet.config()
    assert {key: unet[key] for key in SDXL_UNET} == SDXL_UNET
    assert unet["in_channels"] == unet["out_channels"] == 4
    vae = spec.vae.config()
    assert {key: vae[key] for key in SDXL_VAE} == SDXL_VAE and vae["force_upcast"] is True
    for name, (hidden, layers, heads, intermediate, act, projection) in SDXL_TEXT.items():
        config = presets.text_encoder_config(spec, name)
        shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
        assert shape == (hidden, layers, heads), name
        kind = (config.intermediate_size, config.hidden_act, config.projection_dim)
        assert kind == (intermediate, act, projection), name
        assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    assert spec.scheduler.class_name == "EulerDiscreteScheduler" and spec.scheduler.config() == SDXL_SCHEDULER
    assert spec.tokenizer_2 is not None and spec.tokenizer_2.pad_token == "!"
    assert spec.tokenizer.pad_token == "<|endoftext|>"


# Parameter counts of SDXL base 1.0's networks (the VAE is SD's: 83.65M, 49.49M of it the decoder).
SDXL_COUNTS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_sdxl_parameter_counts_on_meta() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = preset_spec(Preset.SDXL)
    text_2 = presets.text_encoder_config(spec, "text_encoder_2")
    with torch.device("meta"):
        networks = {
            "unet": UNet2DConditionModel(**spec.unet.config()),
            "text_encoder": CLIPTextModel(presets.text_encoder_config(spec)),
            "text_encoder_2": CLIPTextModelWithProjection(text_2),
            "vae": AutoencoderKL(**spec.vae.config()),
        }
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()}
    assert counts == {**SDXL_COUNTS, "vae": 83_653_863}
    assert sum(p.numel() for p in networks["vae"].decoder.parameters()) == 49_490_179
    assert networks["unet"].add_embedding.linear_1.in_features == 2816


def test_mismatched_parts_are_rejected() -> None:
    tiny_xl = preset_spec(Preset.TINY_XL)
    with pytest.raises(ValueError, match="cross_attention_dim 64 != context width 96"):
        dataclasses.replace(tiny_xl, unet=dataclasses.replace(tiny_xl.unet, cross_attention_dim=64))
    text_time = dataclasses.replace(tiny_xl.unet.text_time, pooled_dim=64)
    with pytest.raises(ValueError, match="pooled width 40"):
        dataclasses.replace(tiny_xl, unet=dataclasses.replace(tiny_xl.unet, text_time=text_time))
    with pytest.raises(ValueError, match="come together"):
        dataclasses.replace(tiny_xl, tokenizer_2=None)
    with pytest.raises(ValueError, match="no text encoder 'text_encoder_2' in this preset; it has: text_enc"):
        presets.text_encoder_config(preset_spec(Preset.SD15), "text_encoder_2")


# --- determinism, through the command line ------------------------------------------------------


def test_same_seed_same_bytes_from_the_cli(tiny_xl: Path, tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    assert main(["init-random", "tiny-xl", str(tmp_path / "again")]) == 0
    assert main(["init-random", "tiny-xl", str(tmp_path / "other"), "--seed", "1"]) == 0
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global torch RNG changed"
    reference = _weights(tiny_xl)
    assert len(reference) == 4 and _weights(tmp_path / "again") == reference
    other = _weights(tmp_path / "other")
    assert all(other[name] != data for name, data in reference.items())
    # Each encoder has its own seed: same seed, different weights despite the shared vocabulary.
    assert reference["text_encoder/model.safetensors"] != reference["text_encoder_2/model.safetensors"]


# --- diffusers loads and runs it ---------------------------------------------------------------


def test_sdxl_pipelines_run(tiny_xl: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.watermark is None
    assert pipe.tokenizer.pad_token_id == 999  # EOS, as CLIP-L pads
    assert (pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == ("!", 0)
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size * 8 == 64
    image = two_steps_at_64(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0
    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_xl)
    img2img.set_progress_bar_config(disable=True)
    again = img2img(
        "a lighthouse at dusk",
        image=image,
        strength=0.5,
        num_inference_steps=2,  # one step, from the encoded image
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert again.shape == (1, 64, 64, 3) and np.isfinite(again).all()
