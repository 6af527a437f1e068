"""SDXL (tiny-xl) on the runtime against diffusers' StableDiffusionXLPipeline / Img2Img: same weights,
latents, seeds and sampler; the conditioning (two encoders, pooled, time ids, long prompts, empty
negatives) against a direct torch encode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from engine import Pipeline
from engine.errors import RequestError
from engine.manifest import MANIFEST_NAME
from engine.pipeline import GenerationRequest
from engine.specs import Network
from engine.text.chunks import chunk_prompt
from tests.reference import generators, psnr

PROMPT = "a red fox in fresh snow, morning light"
NEGATIVE = "blurry, low quality"
# More than 75 tokens of the tiny vocabulary: two chunks.
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")
LONG = ", ".join(f"{word} {word}y" for word in WORDS) + ", snowy forest at dawn, soft light, golden hour"


@pytest.fixture(scope="module")
def pipe(tiny_xl_engine: Path) -> Pipeline:
    return Pipeline.load(tiny_xl_engine)


@pytest.fixture(scope="module")
def reference(tiny_xl_model: Path) -> diffusers.StableDiffusionXLPipeline:
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_xl_model)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def encoders(tiny_xl_model: Path) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    first = CLIPTextModel.from_pretrained(tiny_xl_model / "text_encoder").eval()
    second = CLIPTextModelWithProjection.from_pretrained(tiny_xl_model / "text_encoder_2").eval()
    return first, second


def _ours_vs_reference(ours: list[Image.Image], ref: np.ndarray) -> list[float]:
    return [psnr(image, reference) for image, reference in zip(ours, ref, strict=True)]


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
@pytest.mark.parametrize("fused", [True, False])
def test_txt2img_matches_diffusers_with_latents(
    tiny_xl_engine: Path, reference: diffusers.StableDiffusionXLPipeline, negative: str, fused: bool
) -> None:
    """Explicit latents, a negative prompt given and empty (diffusers: None, zeros), its default sampler
    (EulerDiscreteScheduler: "Euler"), fused guidance or host guidance; 72x40 px (latent sides 9 and 5)."""
    pipe = Pipeline.load(tiny_xl_engine, fused_cfg=fused)
    latents = torch.randn(1, 4, 5, 9, generator=torch.Generator().manual_seed(5))
    ours = pipe.generate(PROMPT, negative, steps=5, width=72, height=40, latents=latents.numpy(), seed=5)
    ref = reference(
        PROMPT, negative_prompt=negative or None, num_inference_steps=5, width=72, height=40,
        latents=latents, guidance_scale=7.5, output_type="np",
    ).images  # fmt: skip
    assert ours.parameters["sampler"] == "Euler"  # SDXL base's EulerDiscreteScheduler, A1111's label
    assert min(_ours_vs_reference(ours.images, ref)) >= 40


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_txt2img_seeds_batch_and_samplers_match_diffusers(
    pipe: Pipeline, tiny_xl_model: Path, sampler: str
) -> None:
    """Seeded noise per image (batch 2), another sampler, a negative prompt."""
    from engine.sampling.registry import lookup

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_xl_model)
    entry = lookup(sampler)
    scheduler = getattr(diffusers, entry.diffusers_class)
    ref.scheduler = scheduler.from_config(ref.scheduler.config, **dict(entry.forced))
    ref.set_progress_bar_config(disable=True)
    ours = pipe.generate(
        PROMPT, NEGATIVE, steps=6, width=64, height=64, sampler=sampler, seed=21, batch_size=2
    )
    expected = ref(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, width=64, height=64, guidance_scale=7.5,
        num_images_per_prompt=2, generator=generators(21, 2), output_type="np",
    ).images  # fmt: skip
    assert min(_ours_vs_reference(ours.images, expected)) >= 40
    assert psnr(ours.images[0], expected[1]) < 30  # each image draws from its own seed


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_img2img_matches_diffusers(pipe: Pipeline, tiny_xl_model: Path, negative: str) -> None:
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_xl_model)
    ref.set_progress_bar_config(disable=True)
    ours = pipe.generate(PROMPT, negative, steps=8, width=64, height=48, seed=9, image=init, strength=0.6)
    expected = ref(
        PROMPT, negative_prompt=negative or None, image=init, strength=0.6, num_inference_steps=8,
        guidance_scale=7.5, generator=generators(9, 1), output_type="np",
    ).images  # fmt: skip
    assert min(_ours_vs_reference(ours.images, expected)) >= 40


def _direct(
    encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection], ids1: np.ndarray, ids2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each encoder's penultimate hidden states and encoder 2's text_embeds, straight from transformers."""
    with torch.no_grad():
        out1 = encoders[0](torch.from_numpy(ids1), output_hidden_states=True)
        out2 = encoders[1](torch.from_numpy(ids2), output_hidden_states=True)
    return out1.hidden_states[-2].numpy(), out2.hidden_states[-2].numpy(), out2.text_embeds.numpy()


def test_long_prompt_conditioning_chunk_by_chunk(pipe: Pipeline, encoders: tuple) -> None:
    """Two chunks: context (1, 154, D1 + D2) is [encoder 1 | encoder 2] per chunk; the pooled vector is
    encoder 2's for the first chunk only, one per prompt; a shorter negative reaches both encoders and
    is padded with the empty prompt's encoding."""
    request = GenerationRequest.create(LONG, "ugly", width=64, height=64)
    cond = pipe.conditioning(request)
    chunks1, chunks2 = (chunk_prompt(LONG, tokenizer) for tokenizer in pipe.tokenizers)
    assert chunks1.count == chunks2.count == 2
    assert chunks2.ids[1, -1] == 0 and chunks1.ids[1, -1] == pipe.tokenizers[0].eos_id  # the pads
    width1 = encoders[0].config.hidden_size
    width2 = encoders[1].config.hidden_size
    assert cond.context.shape == (2, 154, width1 + width2)
    assert cond.added["text_embeds"].shape == (2, encoders[1].config.projection_dim)
    assert cond.added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    hidden1, hidden2, pooled = _direct(encoders, chunks1.ids, chunks2.ids)
    positive = cond.context[1]
    for chunk in range(2):
        rows = slice(77 * chunk, 77 * (chunk + 1))
        np.testing.assert_allclose(positive[rows, :width1], hidden1[chunk], atol=1e-5)
        np.testing.assert_allclose(positive[rows, width1:], hidden2[chunk], atol=1e-5)
    np.testing.assert_allclose(cond.added["text_embeds"][1], pooled[0], atol=1e-5)
    negative1, negative2 = (chunk_prompt("ugly", t).ids for t in pipe.tokenizers)
    empty1, empty2 = (chunk_prompt("", t).ids for t in pipe.tokenizers)
    n1, n2, n_pooled = _direct(
        encoders, np.concatenate([negative1, empty1]), np.concatenate([negative2, empty2])
    )
    np.testing.assert_allclose(cond.context[0, :77], np.concatenate([n1[0], n2[0]], axis=-1), atol=1e-5)
    np.testing.assert_allclose(cond.context[0, 77:], np.concatenate([n1[1], n2[1]], axis=-1), atol=1e-5)
    np.testing.assert_allclose(cond.added["text_embeds"][0], n_pooled[0], atol=1e-5)


def test_long_prompt_images_with_a_shorter_negative(pipe: Pipeline) -> None:
    """A two-chunk prompt with a one-chunk negative and with an empty one: no shape error, and the
    two negatives give different images."""
    long = pipe.generate(LONG, "ugly", steps=2, width=64, height=64, seed=1)
    empty = pipe.generate(LONG, "", steps=2, width=64, height=64, seed=1)
    assert long.images[0].size == empty.images[0].size == (64, 64)
    assert psnr(long.images[0], np.asarray(empty.images[0]) / 255.0) < 60


def test_empty_negative_is_zeros_on_sdxl_and_the_empty_encoding_on_sd1(
    pipe: Pipeline, tiny_engine: Path
) -> None:
    xl = pipe.conditioning(GenerationRequest.create(LONG, "", width=64, height=64))
    assert not xl.context[0].any() and not xl.added["text_embeds"][0].any()
    assert xl.context[1].any() and xl.context.shape[1] == 154
    sd1 = Pipeline.load(tiny_engine)
    context = sd1.encode_prompts(GenerationRequest.create(PROMPT, "", width=64, height=64))
    np.testing.assert_array_equal(context[0], sd1.encode_text([""], 1)[0])


def test_clip_skip_picks_earlier_layers(pipe: Pipeline, encoders: tuple) -> None:
    """A1111's clip skip n on SDXL: hidden_states[-(n + 1)] (1: the penultimate, SDXL's own); tiny-xl's
    3-layer second encoder has room for clip skip 2, its 2-layer first encoder does not."""
    ids = chunk_prompt(PROMPT, pipe.tokenizers[1]).ids
    with torch.no_grad():
        hidden = encoders[1](torch.from_numpy(ids), output_hidden_states=True).hidden_states
    for clip_skip in (1, 2):
        encoder = pipe.xl_encoder(Network.TEXT_ENCODER_2, pipe.tokenizers[1], clip_skip)
        states, pooled = encoder.encode(ids)
        np.testing.assert_allclose(states, hidden[-(clip_skip + 1)].numpy(), atol=1e-5)
        assert pooled is not None and pooled.shape == (1, encoders[1].config.projection_dim)
    with pytest.raises(RequestError, match="clip_skip 2 needs 3 layers; this model's text_encoder has 2"):
        pipe.generate(PROMPT, clip_skip=2, steps=1, width=64, height=64)


def _turbo_copy(engine: Path, target: Path) -> Path:
    """The engine folder as an SDXL-Turbo-style export would write it: the same graphs (linked), its
    scheduler EulerAncestralDiscreteScheduler with "trailing" timesteps."""
    target.mkdir()
    for item in engine.iterdir():
        if item.name != MANIFEST_NAME:
            (target / item.name).symlink_to(item)
    manifest = json.loads((engine / MANIFEST_NAME).read_text())
    turbo = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
    manifest["scheduler_config"] = {**manifest["scheduler_config"], **turbo}
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_few_steps_without_guidance(
    tiny_xl_engine: Path, tiny_xl_model: Path, tmp_path: Path, steps: int
) -> None:
    """SDXL-Turbo use: trailing timesteps, 1-4 steps, guidance 0 (no negative pass), 64 px."""
    pipe = Pipeline.load(_turbo_copy(tiny_xl_engine, tmp_path / "turbo"))
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_xl_model)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
        ref.scheduler.config, timestep_spacing="trailing"
    )
    ref.set_progress_bar_config(disable=True)
    ours = pipe.generate(PROMPT, steps=steps, guidance_scale=0.0, width=64, height=64, seed=4)
    expected = ref(
        PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=64, height=64,
        generator=generators(4, 1), output_type="np",
    ).images  # fmt: skip
    assert ours.parameters["sampler"] == "Euler a"
    assert min(_ours_vs_reference(ours.images, expected)) >= 40


def test_sd_turbo_style_few_steps(tiny_engine: Path, tiny_model: Path, tmp_path: Path) -> None:
    """SD-Turbo use on an SD 1.x-shaped model: trailing timesteps, one step, guidance 0."""
    pipe = Pipeline.load(_turbo_copy(tiny_engine, tmp_path / "sd-turbo"))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
        ref.scheduler.config, timestep_spacing="trailing"
    )
    ref.set_progress_bar_config(disable=True)
    ours = pipe.generate(
        PROMPT,
        steps=1,
        guidance_scale=0.0,
        sampler="EulerAncestralDiscreteScheduler",
        seed=8,
        width=64,
        height=64,
    )
    expected = ref(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, width=64, height=64,
        generator=generators(8, 1), output_type="np",
    ).images  # fmt: skip
    assert min(_ours_vs_reference(ours.images, expected)) >= 40


def test_engine_folder_layout(tiny_xl_engine: Path) -> None:
    pipe_networks = {network.value for network in Network}
    manifest = json.loads((tiny_xl_engine / MANIFEST_NAME).read_text())
    assert set(manifest["graphs"]) == pipe_networks
    assert manifest["model_family"] == "sdxl" and manifest["scaling_factor"] == 0.13025
    assert (tiny_xl_engine / "tokenizer_2").is_dir()
    assert manifest["source"]["force_zeros_for_empty_prompt"] is True
    assert manifest["graphs"]["text_encoder_2"]["weights"], "text_encoder_2 has a LoRA weight map"


def test_unsupported_xl_engines_are_refused_in_one_line(tiny_xl_engine: Path, tmp_path: Path) -> None:
    from engine.errors import EngineError

    copy = Path(shutil.copytree(tiny_xl_engine, tmp_path / "no-te2", symlinks=True))
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    del manifest["graphs"]["text_encoder_2"]
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="this SDXL engine folder has no text_encoder_2 graph"):
        Pipeline.load(copy)
