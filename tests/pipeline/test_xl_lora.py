"""LoRAs at run time on SDXL (tiny-xl): text_encoder, text_encoder_2 and the UNet patched, against
diffusers' StableDiffusionXLPipeline with the same file loaded by ``load_lora_weights`` and fused by
``fuse_lora(lora_scale=0.8)`` (peft), same latents and sampler (EulerDiscreteScheduler): PSNR >= 40 dB.

The files are kohya's SDXL layout: ``lora_te1_`` / ``lora_te2_`` / ``lora_unet_`` module names, the
UNet's in the LDM spelling kohya trains SDXL with (``input_blocks_N_1_...``), an ``.alpha`` each. (Kohya
names in diffusers' UNet spelling are covered on SD 1.x, tests/pipeline/test_loras.py: the key matching
is the same for both families.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.adapters import Component, Target, ldm_unet_paths
from engine.pipeline import GenerationRequest, Pipeline
from engine.pipeline.loras import te_key
from engine.specs import Network
from tests.adapters.lora_files import (
    KOHYA_PREFIXES,
    kohya_name,
    lora_factors,
    lora_targets_of,
    save_lora,
    select,
)
from tests.reference import psnr

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a paper lantern in the rain"
SIZE = {"width": 64, "height": 64}
STEPS = 3
GUIDANCE = 7.5
# UNet self / cross attention, feed-forward, 1x1 and 3x3 convs (every level and the mid block, where
# tiny-xl's second transformer block lives); each text encoder's projections and MLP.
UNET_PARTS = (
    "attn1.to_q",
    "attn2.to_k",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "resnets.0.conv1",
)
TEXT_PARTS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")
XL_PREFIXES = {**KOHYA_PREFIXES, Component.TEXT_ENCODER: "lora_te1_text_model_"}


def write_xl_kohya_lora(
    path: Path, targets: Mapping[Target, tuple[int, ...]], seed: int, rank: int = 4
) -> Path:
    """A kohya SDXL LoRA over ``targets``: ``lora_te1_`` / ``lora_te2_`` / ``lora_unet_`` module names
    (the UNet's in the LDM spelling), ``lora_down`` / ``lora_up`` and a 0-d ``alpha`` of ``rank / 2``
    each (so alpha matters: scale 0.5)."""
    rng = np.random.default_rng(seed)
    ldm = ldm_unet_paths(p for c, p in targets if c is Component.UNET)
    tensors: dict[str, np.ndarray] = {}
    for target, shape in targets.items():
        name = kohya_name(target, ldm).replace(KOHYA_PREFIXES[target[0]], XL_PREFIXES[target[0]], 1)
        for suffix, array in lora_factors(rng, shape, rank).items():
            tensors[f"{name}.{suffix}"] = array
        tensors[f"{name}.alpha"] = np.asarray(rank / 2, np.float32).reshape(())
    return save_lora(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0"})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_xl_model: Path) -> Path:
    """xl: every network; te2_only: text_encoder_2 alone; unet_only: the UNet alone."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_xl_model / "unet")
    first = CLIPTextModel.from_pretrained(tiny_xl_model / "text_encoder")
    second = CLIPTextModelWithProjection.from_pretrained(tiny_xl_model / "text_encoder_2")
    targets = lora_targets_of(unet, first, second)
    unet_part = select(targets, *UNET_PARTS, component=Component.UNET)
    te1 = select(targets, *TEXT_PARTS, component=Component.TEXT_ENCODER)
    te2 = select(targets, *TEXT_PARTS, component=Component.TEXT_ENCODER_2)
    assert unet_part and te1 and te2
    folder = tmp_path_factory.mktemp("xl-loras")
    write_xl_kohya_lora(folder / "xl.safetensors", {**unet_part, **te1, **te2}, seed=1)
    write_xl_kohya_lora(folder / "te2_only.safetensors", te2, seed=2)
    write_xl_kohya_lora(folder / "unet_only.safetensors", unet_part, seed=3)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_xl_engine: Path, lora_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_xl_engine, lora_dir=lora_dir)


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)).numpy()


def reference_pipeline(model: Path, lora: Path | None, scale: float = 0.8) -> Any:
    """diffusers' SDXL pipeline, ``lora`` loaded and fused at ``scale`` (None: the plain model)."""
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(model)
    ref.set_progress_bar_config(disable=True)
    if lora is not None:
        ref.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
        ref.fuse_lora(lora_scale=scale)
    return ref


def reference_image(ref: Any, latents: np.ndarray) -> np.ndarray:
    """Our request's image from diffusers: an empty negative is None there (zeros, as
    force_zeros_for_empty_prompt makes ours), guidance given (SDXL's own default is 5)."""
    return ref(
        PROMPT, negative_prompt=None, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        latents=torch.from_numpy(latents), output_type="np", **SIZE,
    ).images[0]  # fmt: skip


def ours(pipe: Pipeline, prompt: str, latents: np.ndarray) -> np.ndarray:
    """Our image for ``prompt`` (LoRA tags in it), an empty negative prompt."""
    result = pipe.generate(prompt, "", steps=STEPS, guidance_scale=GUIDANCE, latents=latents, **SIZE)
    return np.asarray(result.images[0])


def test_kohya_sdxl_lora_matches_diffusers_fuse_lora(
    pipe: Pipeline, tiny_xl_model: Path, lora_dir: Path, latents: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    image = ours(pipe, f"{PROMPT} <lora:xl:0.8>", latents)
    want = reference_image(reference_pipeline(tiny_xl_model, lora_dir / "xl.safetensors"), latents)
    base = reference_image(reference_pipeline(tiny_xl_model, None), latents)
    assert psnr(image, want) >= 40
    assert psnr(image, base) < 35  # the LoRA really changed the image
    assert "match nothing" not in caplog.text  # every key applied, none dropped on both sides


def test_te2_only_lora_changes_the_second_encoder_alone(
    pipe: Pipeline, tiny_xl_model: Path, lora_dir: Path
) -> None:
    """The context's text_encoder_2 columns and the pooled text_embeds change, as diffusers' encode_prompt
    with the LoRA fused gives them; text_encoder's columns stay exactly as they were."""
    plain = GenerationRequest.create(PROMPT, "", **SIZE)
    tagged = GenerationRequest.create(f"{PROMPT} <lora:te2_only:0.8>", "", **SIZE)
    base = pipe.conditioning(plain, te_key(pipe.use_loras(plain)))
    cond = pipe.conditioning(tagged, te_key(pipe.use_loras(tagged)))
    width1 = pipe.graph(Network.TEXT_ENCODER).spec.outputs[0].dims[-1]
    np.testing.assert_array_equal(cond.context[:, :, :width1], base.context[:, :, :width1])
    assert not np.allclose(cond.context[1, :, width1:], base.context[1, :, width1:], atol=1e-3)
    assert not np.allclose(cond.added["text_embeds"][1], base.added["text_embeds"][1], atol=1e-3)
    ref = reference_pipeline(tiny_xl_model, lora_dir / "te2_only.safetensors")
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    np.testing.assert_allclose(cond.context[1], embeds[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(cond.added["text_embeds"][1], pooled[0].numpy(), atol=1e-5)


def test_switching_loras_and_back_to_none_is_exact(pipe: Pipeline, latents: np.ndarray) -> None:
    base = ours(pipe, PROMPT, latents)
    first = ours(pipe, f"{PROMPT} <lora:xl:0.8>", latents)
    te2 = ours(pipe, f"{PROMPT} <lora:te2_only:0.8>", latents)
    assert not np.array_equal(te2, base) and not np.array_equal(te2, first)
    np.testing.assert_array_equal(ours(pipe, PROMPT, latents), base)  # the base graphs, untouched
    np.testing.assert_array_equal(ours(pipe, f"{PROMPT} <lora:xl:0.8>", latents), first)
    np.testing.assert_array_equal(ours(pipe, PROMPT, latents), base)


def test_unet_only_lora_leaves_the_text_encoders_alone(pipe: Pipeline) -> None:
    """A LoRA with no text encoder weights (kohya's --network_train_unet_only) runs the exported text
    encoder graphs, not copies of them."""
    plain = GenerationRequest.create(PROMPT, "", **SIZE)
    pipe.use_loras(plain)
    exported = {network: pipe.graph(network) for network in (*pipe.text_networks, Network.UNET_CFG)}
    pipe.use_loras(GenerationRequest.create(f"{PROMPT} <lora:unet_only:0.8>", "", **SIZE))
    try:
        assert [pipe.graph(network) is graph for network, graph in exported.items()] == [True, True, False]
    finally:
        pipe.use_loras(plain)
