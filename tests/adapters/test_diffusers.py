"""LoRA merges against diffusers' own ``load_lora_weights`` + ``fuse_lora`` on the tiny model.

A kohya file over every Linear and Conv2d weight of the tiny UNet and text encoder (attention
projections, 1x1 proj_in / proj_out / conv_shortcut, 3x3 resnet, sampler and in/out convolutions,
time embeddings, text encoder q/k/v/out/fc1/fc2) with fp16 alphas, and a PEFT file written by peft
and diffusers' ``save_lora_weights`` with its adapter metadata (lora_alpha, an alpha_pattern): every
weight diffusers fuses at lora_scale 0.8 equals ``merge_weight(base, [(delta, 0.8)])``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from engine.adapters import Component, match_lora, merge_weight, read_lora
from tests.adapters.lora_files import select, weights_of, write_kohya_lora, write_peft_lora

pytest.importorskip("peft", reason="diffusers loads LoRAs through peft (the dev extra)")

SCALE = 0.8


def fused_weights(tiny_pipe: Any, path, targets) -> dict:
    """The weights diffusers fuses from ``path`` at lora_scale 0.8, into copies of the tiny modules."""
    from diffusers import StableDiffusionPipeline

    unet, text_encoder = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.text_encoder)
    components = {**tiny_pipe.components, "unet": unet, "text_encoder": text_encoder}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=SCALE)
    return weights_of(unet, text_encoder, targets)


def assert_merges_equal(path, targets, base: dict, fused: dict) -> set:
    """Our merge of every matched module equals diffusers' fused weight; returns the targets merged."""
    match = match_lora(read_lora(path), targets, "sd1")
    assert match.unused_keys == ()
    for delta in match.deltas:
        ours = merge_weight(base[delta.target], [(delta, SCALE)])
        assert not np.array_equal(fused[delta.target], base[delta.target]), (
            delta.target
        )  # diffusers applied it
        np.testing.assert_allclose(ours, fused[delta.target], rtol=1e-5, atol=1e-6, err_msg=str(delta.target))
    return {delta.target for delta in match.deltas}


def test_kohya_file_equals_diffusers_fuse(tmp_path, rng, tiny_pipe, tiny_targets, tiny_weights):
    path = write_kohya_lora(
        tmp_path / "kohya.safetensors",
        tiny_targets,
        rank=4,
        alpha=3.0,
        seed=int(rng.integers(2**31)),
        alpha_dtype=np.float16,
    )
    kernels = {shape[2:] for shape in tiny_targets.values()}
    assert kernels == {(), (1, 1), (3, 3)}  # Linear, 1x1 and 3x3 convolutions
    merged = assert_merges_equal(
        path, tiny_targets, tiny_weights, fused_weights(tiny_pipe, path, tiny_targets)
    )
    assert merged == set(tiny_targets)


def test_peft_file_with_metadata_equals_diffusers_fuse(tmp_path, rng, tiny_pipe, tiny_targets, tiny_weights):
    unet = select(
        tiny_targets,
        "attn1.to_",
        "attn2.to_",
        "proj_in",
        "proj_out",
        "conv_shortcut",
        "resnets.0.conv1",
        component=Component.UNET,
    )
    text = select(tiny_targets, "self_attn", "mlp", component=Component.TEXT_ENCODER)
    path = write_peft_lora(
        tmp_path / "peft.safetensors",
        tiny_pipe.unet,
        tiny_pipe.text_encoder,
        [path for _, path in unet],
        [path for _, path in text],
        rank=4,
        alpha=8.0,
        seed=int(rng.integers(2**31)),
        alpha_pattern={"to_k": 2.0, "k_proj": 16.0},
    )
    targets = {**unet, **text}
    merged = assert_merges_equal(path, targets, tiny_weights, fused_weights(tiny_pipe, path, targets))
    assert merged == set(targets)
    scales = {
        delta.target[1].rsplit(".", 1)[-1]: delta.scale
        for delta in match_lora(read_lora(path), targets, "sd1").deltas
    }
    assert scales["to_k"] == 0.5 and scales["k_proj"] == 4.0 and scales["to_q"] == 2.0
