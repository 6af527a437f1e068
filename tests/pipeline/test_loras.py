"""LoRAs at run time and A1111's prompt syntax, end to end on the tiny engine against diffusers.

Reference images: diffusers' StableDiffusionPipeline on the same random-weight model with the same
LoRA file loaded by ``load_lora_weights`` and fused by ``fuse_lora(lora_scale=0.8)`` (peft), same seed
and sampler: PSNR >= 40 dB. Switching between LoRAs and back to none gives each image exactly again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.adapters import AdapterError
from engine.errors import RequestError
from engine.pipeline import Pipeline
from tests.adapters.lora_files import (
    lora_targets_of,
    select,
    write_kohya_lora,
    write_peft_lora,
    write_sdxl_like_lora,
)
from tests.reference import diffusers_pipeline, generators, psnr
from tests.text.test_weighted_conditioning import (
    LONG_PROMPT,
    LONG_SEGMENTS,
    NEGATIVE,
    NEGATIVE_SEGMENTS,
    reference_conditioning,
)

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

PROMPT = "a paper lantern in the rain"
SETTINGS = {"steps": 4, "width": 64, "height": 64, "sampler": "Euler a", "seed": 11}
# UNet attention (self and cross), a 1x1 conv, 3x3 convs, and the text encoder's projections.
UNET_PARTS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "proj_in", "resnets.0.conv1")
TEXT_PARTS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


@pytest.fixture(scope="module")
def reference_modules(tiny_model: Path) -> tuple[object, object]:
    import transformers
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model / "unet"))
    text_encoder = transformers.CLIPTextModel.from_pretrained(str(tiny_model / "text_encoder"))
    return unet, text_encoder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, reference_modules: tuple[object, object]) -> Path:
    """kohya_style: kohya keys with alphas; peft_style: peft adapters saved by diffusers; other: a second
    kohya file with other weights; sdxl_thing: an SDXL-shaped file."""
    unet, text_encoder = reference_modules
    folder = tmp_path_factory.mktemp("loras")
    targets = lora_targets_of(unet, text_encoder)
    chosen = {**select(targets, *UNET_PARTS, component=None), **select(targets, *TEXT_PARTS)}
    write_kohya_lora(folder / "kohya_style.safetensors", chosen, rank=4, alpha=2.0, seed=1)
    write_kohya_lora(folder / "sub" / "other.safetensors", chosen, rank=2, alpha=None, seed=2)
    unet_names = [path for component, path in select(targets, *UNET_PARTS[:4]) if component.value == "unet"]
    text_names = [
        path for component, path in select(targets, *TEXT_PARTS) if component.value == "text_encoder"
    ]
    write_peft_lora(folder / "peft_style.safetensors", unet, text_encoder, unet_names, text_names, seed=3)
    write_sdxl_like_lora(folder / "sdxl_thing.safetensors")
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_engine: Path, lora_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_engine, lora_dir=lora_dir)


def reference(tiny_model: Path, lora: Path | None, scale: float = 0.8, **kwargs: object) -> np.ndarray:
    """diffusers' image with ``lora`` loaded and fused at ``scale`` (none: the plain model)."""
    pipe = diffusers_pipeline(tiny_model, SETTINGS["sampler"])
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
        pipe.fuse_lora(lora_scale=scale)
    prompt = kwargs.pop("prompt", PROMPT)
    return pipe(
        prompt, num_inference_steps=SETTINGS["steps"], width=64, height=64, guidance_scale=7.5,
        generator=generators(SETTINGS["seed"], 1), output_type="np", **kwargs,
    ).images[0]  # fmt: skip


def image(result: object) -> np.ndarray:
    return np.asarray(result.images[0])  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["kohya_style", "peft_style"])
def test_lora_image_matches_diffusers_fuse_lora(
    pipe: Pipeline, tiny_model: Path, lora_dir: Path, name: str
) -> None:
    ours = pipe.generate(f"{PROMPT} <lora:{name}:0.8>", **SETTINGS)
    want = reference(tiny_model, lora_dir / f"{name}.safetensors")
    assert psnr(image(ours), want) >= 40
    base = reference(tiny_model, None)
    assert psnr(image(ours), base) < 35  # the LoRA really changed the image
    assert f'Lora hashes: "{name}: ' in ours.infotext(0)
    assert ours.infotext(0).startswith(f"{PROMPT} <lora:{name}:0.8>")  # the prompt as typed


def test_switching_loras_and_back_to_none_is_exact(pipe: Pipeline, tiny_engine: Path, lora_dir: Path) -> None:
    base = image(pipe.generate(PROMPT, **SETTINGS))
    first = {
        name: image(pipe.generate(f"{PROMPT} <lora:{name}:0.8>", **SETTINGS))
        for name in ("kohya_style", "other")
    }
    assert not np.array_equal(first["kohya_style"], first["other"])
    for name in ("kohya_style", "other", "kohya_style"):
        again = image(pipe.generate(f"{PROMPT} <lora:{name}:0.8>", **SETTINGS))
        np.testing.assert_array_equal(again, first[name])
    np.testing.assert_array_equal(
        image(pipe.generate(PROMPT, **SETTINGS)), base
    )  # the base graphs, untouched
    fresh = Pipeline.load(tiny_engine, lora_dir=lora_dir)
    np.testing.assert_array_equal(
        image(fresh.generate(f"{PROMPT} <lora:other:0.8>", **SETTINGS)), first["other"]
    )


def test_loras_argument_paths_and_multipliers(pipe: Pipeline, lora_dir: Path) -> None:
    tagged = image(pipe.generate(f"{PROMPT} <lora:kohya_style:0.8>", **SETTINGS))
    by_name = image(pipe.generate(PROMPT, loras={"kohya_style": 0.8}, **SETTINGS))
    by_path = image(pipe.generate(PROMPT, loras={str(lora_dir / "kohya_style.safetensors"): 0.8}, **SETTINGS))
    np.testing.assert_array_equal(by_name, tagged)
    np.testing.assert_array_equal(by_path, tagged)
    halves = image(pipe.generate(f"{PROMPT} <lora:kohya_style:0.4> <lora:kohya_style:0.4>", **SETTINGS))
    np.testing.assert_array_equal(halves, tagged)  # the same file twice: multipliers add
    base = image(pipe.generate(PROMPT, **SETTINGS))
    np.testing.assert_array_equal(image(pipe.generate(f"{PROMPT} <lora:kohya_style:0:0>", **SETTINGS)), base)
    unet_only = image(pipe.generate(f"{PROMPT} <lora:kohya_style:0:0.8>", **SETTINGS))
    te_only = image(pipe.generate(f"{PROMPT} <lora:kohya_style:0.8:0>", **SETTINGS))
    assert not np.array_equal(unet_only, tagged) and not np.array_equal(te_only, tagged)
    assert not np.array_equal(unet_only, base) and not np.array_equal(te_only, base)
    negative = image(pipe.generate(f"{PROMPT} <LORA:kohya_style:-0.5>", **SETTINGS))
    assert not np.array_equal(negative, base)


@pytest.mark.parametrize(
    ("prompt", "error", "words"),
    [
        (f"{PROMPT} <lora:nope:1>", RequestError, "nope"),
        (f"{PROMPT} <lora:sdxl_thing:1>", AdapterError, "SDXL"),
        (f"{PROMPT} <hypernet:thing:1>", RequestError, "hypernet"),
        (f"{PROMPT} <lora:kohya_style:1:2:3>", RequestError, "at most two"),
        (f"{PROMPT} <lora:kohya_style:1e30>", RequestError, "within -10..10"),
        (f"{PROMPT} <lora:/etc/passwd>", RequestError, "/etc/passwd"),  # tags never reach files elsewhere
    ],
)
def test_bad_loras_are_one_line_errors(pipe: Pipeline, prompt: str, error: type, words: str) -> None:
    with pytest.raises(error) as raised:
        pipe.generate(prompt, **SETTINGS)
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_loras_argument_shows_in_the_infotext_as_tags(pipe: Pipeline, lora_dir: Path) -> None:
    path = lora_dir / "kohya_style.safetensors"
    result = pipe.generate(PROMPT, loras={str(path): (0.5, 0.8), "other": 0.3}, **SETTINGS)
    first_line = result.infotext(0).splitlines()[0]
    assert first_line == f"{PROMPT} <lora:kohya_style:0.5:0.8> <lora:other:0.3>"
    with pytest.raises(RequestError, match="LoRA file not found"):
        pipe.generate(PROMPT, loras={str(lora_dir / "gone.safetensors"): 1}, **SETTINGS)
    with pytest.raises(RequestError, match=r"within -10\.\.10"):
        pipe.generate(PROMPT, loras={"other": 11}, **SETTINGS)


def test_a_tag_without_lora_dir_says_so(tiny_engine: Path) -> None:
    pipe = Pipeline.load(tiny_engine)
    with pytest.raises(RequestError, match="lora_dir"):
        pipe.generate(f"{PROMPT} <lora:kohya_style>", **SETTINGS)


def test_torch_backend_applies_and_restores_in_place(
    tiny_torch_engine: Path, pipe: Pipeline, lora_dir: Path
) -> None:
    torch_pipe = Pipeline.load(tiny_torch_engine, backend="torch", lora_dir=lora_dir)
    base = image(torch_pipe.generate(PROMPT, **SETTINGS))
    ours = image(torch_pipe.generate(f"{PROMPT} <lora:kohya_style:0.8>", **SETTINGS))
    assert psnr(ours, image(pipe.generate(f"{PROMPT} <lora:kohya_style:0.8>", **SETTINGS)) / 255) >= 40
    np.testing.assert_array_equal(image(torch_pipe.generate(PROMPT, **SETTINGS)), base)


def test_weighted_long_prompt_matches_diffusers_given_reference_embeddings(
    pipe: Pipeline, tiny_model: Path, reference_modules: tuple[object, object]
) -> None:
    """A 3-chunk prompt with weights and BREAK and a 1-chunk negative: our image against diffusers fed
    the prompt embeddings an independent torch implementation of A1111's rules gives."""
    import transformers

    hf = transformers.CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"))
    hf.model_max_length = 10**6
    _, text_encoder = reference_modules
    embeds = torch.from_numpy(
        reference_conditioning(text_encoder.eval(), hf, [NEGATIVE_SEGMENTS, LONG_SEGMENTS])
    )
    ours = pipe.generate(LONG_PROMPT, NEGATIVE, **SETTINGS)
    want = reference(
        tiny_model, None, prompt=None, prompt_embeds=embeds[1:2], negative_prompt_embeds=embeds[0:1]
    )
    assert psnr(image(ours), want) >= 40
