"""txt2img / img2img on the runtime against diffusers' own pipelines: same weights, seed, sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Pipeline
from engine.errors import Cancelled, RequestError
from engine.pipeline import GenerationRequest
from engine.specs import Network
from tests.reference import diffusers_pipeline, generators, psnr

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipe(tiny_engine: Path) -> Pipeline:
    return Pipeline.load(tiny_engine)


@pytest.mark.parametrize(
    "sampler",
    ["Euler a", "Euler", "DPM++ 2M Karras", "DDIM", "Heun", "DPM2 a", "DPM++ 2M SDE", "UniPC", "LMS", "PNDM"],
)
def test_txt2img_matches_diffusers(pipe: Pipeline, tiny_model: Path, sampler: str) -> None:
    seed = int(np.random.default_rng().integers(0, 2**31))
    ours = pipe.generate(PROMPT, steps=8, width=64, height=64, sampler=sampler, seed=seed)
    ref = diffusers_pipeline(tiny_model, sampler)(
        PROMPT, num_inference_steps=8, width=64, height=64, guidance_scale=7.5,
        generator=generators(seed, 1), output_type="np",
    ).images  # fmt: skip
    assert ours.seeds == [seed]
    assert psnr(ours.images[0], ref[0]) >= 40


@pytest.mark.parametrize(("width", "height"), [(96, 64), (72, 56)])
def test_batch_negative_prompt_and_odd_sizes(
    pipe: Pipeline, tiny_model: Path, width: int, height: int
) -> None:
    """Batch 2 with a negative prompt, non-square, and latent sides that are not multiples of 8."""
    ours = pipe.generate(
        PROMPT, NEGATIVE, steps=6, width=width, height=height, sampler="Euler a", seed=7, batch_size=2
    )
    ref = diffusers_pipeline(tiny_model, "Euler a")(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, width=width, height=height,
        num_images_per_prompt=2, generator=generators(7, 2), output_type="np",
    ).images  # fmt: skip
    assert ours.seeds == [7, 8]
    assert [im.size for im in ours.images] == [(width, height)] * 2
    for image, reference in zip(ours.images, ref, strict=True):
        assert psnr(image, reference) >= 40
    assert psnr(ours.images[0], ref[1]) < 30  # the two images differ: seeds really are per image


def test_guidance_rescale_and_no_cfg(pipe: Pipeline, tiny_model: Path) -> None:
    reference = diffusers_pipeline(tiny_model, "DDIM")
    ours = pipe.generate(PROMPT, steps=5, width=64, height=64, sampler="DDIM", seed=3, guidance_rescale=0.7)
    ref = reference(PROMPT, num_inference_steps=5, width=64, height=64, guidance_rescale=0.7,
                    generator=generators(3, 1), output_type="np").images  # fmt: skip
    assert psnr(ours.images[0], ref[0]) >= 40
    ours = pipe.generate(PROMPT, steps=5, width=64, height=64, sampler="DDIM", seed=3, guidance_scale=1.0)
    ref = reference(PROMPT, num_inference_steps=5, width=64, height=64, guidance_scale=1.0,
                    generator=generators(3, 1), output_type="np").images  # fmt: skip
    assert psnr(ours.images[0], ref[0]) >= 40


def test_clip_skip_2_uses_the_penultimate_layer(pipe: Pipeline, tiny_model: Path) -> None:
    """A1111's clip skip 2 on prompt and negative alike; diffusers gets the same embeddings by hand."""
    reference = diffusers_pipeline(tiny_model, "Euler")
    embeds = []
    for text in (PROMPT, NEGATIVE):
        ids = reference.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = reference.text_encoder(ids.input_ids, output_hidden_states=True)
            embeds.append(reference.text_encoder.final_layer_norm(out.hidden_states[-2]))
    ours = pipe.generate(PROMPT, NEGATIVE, steps=6, width=64, height=64, sampler="Euler", seed=5, clip_skip=2)
    ref = reference(
        prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=6, width=64, height=64,
        generator=generators(5, 1), output_type="np",
    ).images  # fmt: skip
    assert psnr(ours.images[0], ref[0]) >= 40
    plain = pipe.generate(PROMPT, NEGATIVE, steps=6, width=64, height=64, sampler="Euler", seed=5)
    assert psnr(plain.images[0], ref[0]) < 40  # clip skip changes the picture


@pytest.mark.parametrize(("strength", "sampler"), [(0.5, "Euler a"), (0.8, "DPM++ 2M Karras"), (1.0, "DDIM")])
def test_img2img_matches_diffusers(pipe: Pipeline, tiny_model: Path, strength: float, sampler: str) -> None:
    rng = np.random.default_rng()
    init = Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8))
    seed = int(rng.integers(0, 2**31))
    ours = pipe.generate(PROMPT, NEGATIVE, steps=10, width=80, height=64, sampler=sampler, seed=seed,
                         image=init, strength=strength, batch_size=2)  # fmt: skip
    ref = diffusers_pipeline(tiny_model, sampler, img2img=True)(
        PROMPT, negative_prompt=NEGATIVE, image=init, strength=strength, num_inference_steps=10,
        num_images_per_prompt=2, generator=generators(seed, 2), output_type="np",
    ).images  # fmt: skip
    for image, reference in zip(ours.images, ref, strict=True):
        assert psnr(image, reference) >= 40


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M"])
def test_v_prediction_model_matches_diffusers(tiny_v_engine: Path, tiny_v_model: Path, sampler: str) -> None:
    """SD 2 style: v-prediction, linear projection, upcast attention, "!" padding."""
    prompt = "wow! a cat!"
    ours = Pipeline.load(tiny_v_engine).generate(
        prompt, steps=6, width=64, height=64, sampler=sampler, seed=11
    )
    ref = diffusers_pipeline(tiny_v_model, sampler)(
        prompt, num_inference_steps=6, width=64, height=64, generator=generators(11, 1), output_type="np"
    ).images
    assert psnr(ours.images[0], ref[0]) >= 40


def test_latents_argument_is_unscaled_noise(pipe: Pipeline, tiny_model: Path) -> None:
    noise = np.random.default_rng().standard_normal((1, 4, 8, 8), dtype=np.float32)
    ours = pipe.generate(PROMPT, steps=5, width=64, height=64, sampler="Euler", seed=0, latents=noise)
    ref = diffusers_pipeline(tiny_model, "Euler")(
        PROMPT, num_inference_steps=5, width=64, height=64, latents=torch.from_numpy(noise), output_type="np"
    ).images
    assert psnr(ours.images[0], ref[0]) >= 40


def test_torch_backend_gives_the_same_image(tiny_engine: Path, pipe: Pipeline) -> None:
    settings = {"steps": 4, "width": 64, "height": 64, "sampler": "DPM++ 2M Karras", "seed": 21}
    ort_image = pipe.generate(PROMPT, **settings).images[0]
    torch_image = Pipeline.load(tiny_engine, backend="torch").generate(PROMPT, **settings).images[0]
    assert psnr(ort_image, np.asarray(torch_image) / 255.0) >= 40


def test_on_step_sees_every_step_and_can_cancel(pipe: Pipeline) -> None:
    seen = []
    pipe.generate(PROMPT, steps=4, width=64, height=64, sampler="Heun", seed=1, on_step=seen.append)
    assert [(s.step, s.total) for s in seen] == [
        (i, 7) for i in range(1, 8)
    ]  # Heun: 2 evaluations a step, 1 last
    with pytest.raises(Cancelled, match="step 2/4"):
        pipe.run(
            GenerationRequest.create(PROMPT, steps=4, width=64, height=64, seed=1),
            on_step=lambda info: info.step < 2,
        )


def test_prompt_embeddings_are_cached(pipe: Pipeline) -> None:
    """A repeated prompt (and negative) runs no text encoder: every chunk is an LRU hit."""
    prompt = f"a unique prompt for caching {np.random.default_rng().integers(1 << 30)}"
    pipe.generate(prompt, steps=1, width=64, height=64, seed=1)
    graph = pipe.graph(Network.TEXT_ENCODER)
    calls: list[np.ndarray] = []

    class Counting:  # the graph, counting the ids it is given
        def __getattr__(self, name: str) -> object:
            return getattr(graph, name)

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            calls.append(feeds["input_ids"])
            return graph.run(feeds)

    pipe._graphs[Network.TEXT_ENCODER] = Counting()  # type: ignore[assignment]
    try:
        result = pipe.generate(prompt, steps=1, width=64, height=64, seed=1)
        assert calls == []
        pipe.generate(f"{prompt}, and more", steps=1, width=64, height=64, seed=1)
        assert len(calls) == 1 and calls[0].shape == (1, 77)  # only the new prompt's chunk
    finally:
        pipe._graphs[Network.TEXT_ENCODER] = graph
    assert "text_encoder" in result.timings  # a cache hit still reports the stage


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 100}, "width must be a multiple of 8"),
        ({"steps": 0}, "steps must be"),
        ({"sampler": "Euler z"}, "unknown sampler 'Euler z'; valid: .*DPM\\+\\+ 2M Karras"),
        ({"strength": 1.5, "image": Image.new("RGB", (64, 64))}, r"strength must be a number in \(0, 1\]"),
        ({"clip_skip": 3}, "clip_skip 3: this model's text encoder has only 2 layers"),
        ({"clip_skip": 13}, r"clip_skip must be an integer in 1\.\.12"),
        ({"latents": np.zeros((1, 4, 9, 8), np.float32)}, r"latents must be of shape \[1, 4, 8, 8\]"),
        ({"latents": np.zeros((2, 4, 8, 8), np.float32)}, r"latents must be of shape \[1, 4, 8, 8\]"),
        ({"stepz": 3}, "unknown setting 'stepz'; valid settings: steps, "),
        ({"callback": print}, "unknown setting 'callback'; valid settings: "),
    ],
)
def test_bad_requests_raise_one_line_request_error(pipe: Pipeline, settings: dict, message: str) -> None:
    """Model-independent checks when the request is built, the model's own (sizes, latents) in run."""
    with pytest.raises(RequestError, match=message) as error:
        pipe.generate(PROMPT, **{"width": 64, "height": 64, **settings})
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


@pytest.mark.parametrize("sampler", ["DPM++ SDE Karras", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a AYS"])
def test_samplers_beyond_diffusers_are_seed_deterministic(pipe: Pipeline, sampler: str) -> None:
    """No diffusers counterpart (or, for DPM++ SDE, diffusers' Brownian tree needs torchsde): same seed,
    same image; another seed, another image."""
    settings = {"steps": 5, "width": 64, "height": 64, "sampler": sampler}
    first = np.asarray(pipe.generate(PROMPT, seed=9, **settings).images[0])
    again = np.asarray(pipe.generate(PROMPT, seed=9, **settings).images[0])
    other = np.asarray(pipe.generate(PROMPT, seed=10, **settings).images[0])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_more_prompts_than_the_embedding_cache_holds(pipe: Pipeline) -> None:
    """70 distinct prompts overflow the 64-entry LRU within one request: each still gets its own."""
    prompts = [f"prompt number {i} {np.random.default_rng().integers(1 << 30)}" for i in range(70)]
    request = GenerationRequest.create(prompts, steps=1, width=64, height=64, seed=3, sampler="Euler")
    context = pipe.encode_prompts(request)
    assert context.shape == (140, 77, 32)  # [negatives; positives]

    def encode_alone(text: str) -> np.ndarray:  # the graph itself: no cache involved
        ids = pipe.tokenizer.encode([text])
        return pipe.graph(Network.TEXT_ENCODER).run({"input_ids": ids})["last_hidden_state"][0]

    for i in (0, 5, 63, 64, 69):
        np.testing.assert_allclose(context[70 + i], encode_alone(prompts[i]), atol=1e-5)
    np.testing.assert_allclose(context[:70], np.broadcast_to(encode_alone(""), (70, 77, 32)), atol=1e-5)
    result = pipe.run(request)
    assert len(result.images) == 70 and result.seeds == list(range(3, 73))
    alone = pipe.generate(prompts[69], steps=1, width=64, height=64, seed=72, sampler="Euler").images[0]
    assert psnr(result.images[69], np.asarray(alone) / 255.0) >= 40
