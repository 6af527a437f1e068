"""TensorRT builds of SDXL engine folders: profiles, default sizes, plan targets and keys from the specs.

Everything but the last test is pure (no tensorrt, no GPU, no model): SDXL's real sizes are only numbers
in the spec table. The last test builds and runs tiny-xl plans and skips, saying why, without tensorrt
and a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.build_trt import (
    BuildSettings,
    ProfileKind,
    ShapeProfile,
    default_profiles,
    default_sizes,
)
from engine.commands import build as build_command
from engine.errors import BuildError, EngineFolderError, MissingDependencyError
from engine.manifest import read_manifest
from engine.specs import ModelDims, Network, Precision, check_inputs, graph_specs
from engine.tensorrt.builder import parity_points, plan_targets, precision_note, tokenizer_dir
from engine.tensorrt.plans import INDEX_NAME, PLAN_DIR, GpuInfo, PlanTarget, plan_key
from engine.tensorrt.profiles import network_batch, profile_shapes
from tests.tensorrt.test_build_trt import SD15, _fake_engine_folder, _manifest, _parse

# SDXL base 1.0: CLIP ViT-L (768 wide, 12 layers) and OpenCLIP bigG (1280, 32) projected to 1280, six
# time ids; the UNet's context is both encoders' states side by side: 768 + 1280 = 2048.
SDXL = ModelDims(
    text_hidden_size=768,
    text_num_layers=12,
    text_hidden_size_2=1280,
    text_num_layers_2=32,
    pooled_size=1280,
    time_ids_size=6,
)
XL_SPECS = graph_specs(SDXL)
GPU = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _xl_manifest(**changes: Any) -> Any:
    return _manifest(dims=SDXL, family="sdxl", **changes)


# -- profiles ----------------------------------------------------------------------------------


def test_xl_default_profile_shapes_of_every_network() -> None:
    """opt 1024x1024 -> 128x128 latents; the plain UNet's batch doubles; the fused-guidance UNet's
    conditioning (context, text_embeds, time_ids) is on twice the images."""
    assert SDXL.context_size == 2048 and set(XL_SPECS) == set(Network)
    (profile,) = default_profiles("sdxl", max_tokens=154)
    assert profile.label == "b1-1024x1024-t77..154"
    shapes = {network: profile_shapes(spec, profile, SDXL) for network, spec in XL_SPECS.items()}
    assert shapes[Network.TEXT_ENCODER] == shapes[Network.TEXT_ENCODER_2] == {"input_ids": ((1, 77),) * 3}
    assert shapes[Network.UNET] == {
        "sample": ((1, 4, 128, 128), (2, 4, 128, 128), (2, 4, 128, 128)),
        "timestep": ((1,), (2,), (2,)),
        "encoder_hidden_states": ((1, 77, 2048), (2, 77, 2048), (2, 154, 2048)),
        "text_embeds": ((1, 1280), (2, 1280), (2, 1280)),
        "time_ids": ((1, 6), (2, 6), (2, 6)),
    }
    assert shapes[Network.UNET_CFG] == {
        "sample": ((1, 4, 128, 128),) * 3,
        "timestep": ((1,),) * 3,
        "encoder_hidden_states": ((2, 77, 2048), (2, 77, 2048), (2, 154, 2048)),
        "text_embeds": ((2, 1280),) * 3,
        "time_ids": ((2, 6),) * 3,
    }  # guidance_scale is fixed (1,): no profile
    assert shapes[Network.VAE_DECODER] == {"latent": ((1, 4, 128, 128),) * 3}
    assert shapes[Network.VAE_ENCODER] == {"image": ((1, 3, 1024, 1024),) * 3}


def test_xl_dynamic_default_spans_the_aspect_buckets() -> None:
    (profile,) = default_profiles("sdxl", ProfileKind.DYNAMIC, [2, 1, 3], 154)
    assert profile.width == profile.height == (640, 1024, 1536) and profile.batch == (1, 2, 3)
    unet = profile_shapes(XL_SPECS[Network.UNET], profile, SDXL)
    assert unet["sample"] == ((1, 4, 80, 80), (4, 4, 128, 128), (6, 4, 192, 192))
    assert unet["time_ids"] == ((1, 6), (4, 6), (6, 6))
    fused = profile_shapes(XL_SPECS[Network.UNET_CFG], profile, SDXL)
    assert fused["text_embeds"] == ((2, 1280), (4, 1280), (6, 1280))
    assert fused["encoder_hidden_states"] == ((2, 77, 2048), (4, 77, 2048), (6, 154, 2048))
    text_2 = profile_shapes(XL_SPECS[Network.TEXT_ENCODER_2], profile, SDXL)
    assert text_2["input_ids"] == ((1, 77), (2, 77), (3, 77))
    assert network_batch(Network.TEXT_ENCODER_2, profile) == network_batch(Network.TEXT_ENCODER, profile)


@pytest.mark.parametrize("network", SDXL.networks)
@pytest.mark.parametrize("kind", list(ProfileKind))
def test_xl_profile_shapes_satisfy_the_spec(network: Network, kind: ProfileKind) -> None:
    """Every input with a symbolic axis has a profile, and min / opt / max pass the runtime's check."""
    spec = XL_SPECS[network]
    for profile in default_profiles("sdxl", kind, [1, 2], 154):
        shapes = profile_shapes(spec, profile, SDXL)
        assert set(shapes) == {t.name for t in spec.inputs if t.symbols()}
        for i in range(3):
            feeds = {t.name: np.zeros(shapes.get(t.name, (t.dims,) * 3)[i], t.dtype) for t in spec.inputs}
            check_inputs(spec, feeds)


def test_default_sizes_by_family() -> None:
    assert default_sizes("sdxl").opt == (1024, 1024)
    assert default_sizes("sd1") == default_sizes("sd2") == default_sizes("anything else")
    assert default_profiles("sd1") == (ShapeProfile.static(1, 512, 512),)  # as before SDXL
    assert default_profiles("sdxl") == (ShapeProfile.static(1, 1024, 1024),)
    assert BuildSettings().profiles is None  # build_engine picks the folder's default


def test_xl_parity_points_cover_the_fused_conditioning() -> None:
    (profile,) = default_profiles("sdxl")
    points = parity_points(XL_SPECS[Network.UNET_CFG], [profile], SDXL)
    assert [(s["batch"], s["context_batch"], s["latent_height"]) for _, s in points] == [(1, 2, 128)]


# -- the build command ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "argv", "labels"),
    [
        ("sdxl", [], ["b1-1024x1024-t77..154"]),
        ("sd1", [], ["b1-512x512-t77..154"]),  # unchanged
        (
            "sdxl",
            ["--size", "832x1216", "--batch", "1", "2"],
            ["b1-832x1216-t77..154", "b2-832x1216-t77..154"],
        ),
        ("sdxl", ["--profile", "dynamic"], ["b1-640x640..1536x1536-t77..154"]),
        ("sdxl", ["--profile", "dynamic", "--max-size", "1216x1216"], ["b1-640x640..1216x1216-t77..154"]),
        ("sd1", ["--profile", "dynamic"], ["b1-512x512-t77..154"]),  # unchanged
    ],
)
def test_command_profiles_default_to_the_family(family: str, argv: list[str], labels: list[str]) -> None:
    settings = build_command.settings_from_args(_parse("ENGINE", *argv), family)
    assert [p.label for p in settings.profiles] == labels


def test_build_command_reads_the_family_from_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command reads the manifest before any GPU work: --vae fp16 on SDXL fails in one line."""
    engine_dir = _fake_engine_folder(tmp_path / "xl", _xl_manifest())
    assert read_manifest(engine_dir).model_family == "sdxl"
    assert build_command.main([str(engine_dir), "--vae", "fp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vae fp16 is not available for SDXL" in err[0] and "overflows" in err[0]
    assert not (engine_dir / PLAN_DIR).exists()


# -- what gets built -------------------------------------------------------------------------


def test_xl_plan_targets_and_fp32_vae() -> None:
    manifest = _xl_manifest(precision=Precision.FP16)
    targets = plan_targets(manifest, BuildSettings())
    assert [(t.name, t.strongly_typed) for t in targets] == [
        ("text_encoder-fp16", True),
        ("text_encoder_2-fp16", True),
        ("unet_cfg-fp16", True),
        ("vae_decoder-fp32", False),  # the SDXL export keeps the VAE in fp32
        ("vae_encoder-fp32", False),
    ]
    every = plan_targets(manifest, BuildSettings(networks=tuple(Network)))
    assert [t.name for t in every] == [f"{n.value}-{'fp32' if 'vae' in n.value else 'fp16'}" for n in Network]
    notes = {t.name: precision_note(SDXL, t) for t in every}
    note = "; fp32 only: the SDXL VAE overflows in fp16"
    assert notes["vae_decoder-fp32"] == notes["vae_encoder-fp32"] == note
    assert not any(notes[name] for name in notes if "vae" not in name)
    with pytest.raises(BuildError, match=r"--vae fp16 is not available for SDXL"):
        plan_targets(manifest, BuildSettings(vae_precision=Precision.FP16))
    unet_only = BuildSettings(networks=(Network.UNET,), vae_precision=Precision.FP16)
    assert [t.name for t in plan_targets(manifest, unet_only)] == ["unet-fp16"]  # no VAE: nothing to refuse


def test_sd_folders_have_no_second_text_encoder() -> None:
    sd = _manifest()
    assert [t.name for t in plan_targets(sd, BuildSettings(networks=tuple(Network)))] == [
        "text_encoder-fp16", "unet-fp16", "unet_cfg-fp16", "vae_decoder-fp32", "vae_encoder-fp32",
    ]  # fmt: skip
    assert precision_note(SD15, PlanTarget(Network.VAE_DECODER, Precision.FP32)) == ""
    with pytest.raises(EngineFolderError, match=r"\['text_encoder_2'\] \(only SDXL has text_encoder_2\)"):
        plan_targets(sd, BuildSettings(networks=(Network.TEXT_ENCODER_2,)))


def test_each_text_encoder_draws_parity_tokens_from_its_tokenizer() -> None:
    xl, sd = _xl_manifest(), _manifest()
    assert tokenizer_dir(xl, Network.TEXT_ENCODER_2) == "tokenizer_2"
    assert tokenizer_dir(xl, Network.TEXT_ENCODER) == tokenizer_dir(sd, Network.TEXT_ENCODER) == "tokenizer"


def test_xl_plan_keys_differ_from_sd15() -> None:
    """Same ONNX hash, settings and GPU: the UNet and VAE keys still differ by their profile shapes
    (the text encoders' token inputs are alike: their keys differ by the ONNX hash)."""
    profiles, settings = (ShapeProfile.static(1, 1024, 1024),), BuildSettings()
    for network in (Network.UNET, Network.UNET_CFG, Network.VAE_DECODER):
        target = PlanTarget(network, Precision.FP16)
        keys = [
            plan_key(target, graph_specs(dims)[network], "ab" * 32, profiles, dims, settings, "10.7.0", GPU)
            for dims in (SD15, SDXL)
        ]
        same_shapes = network is Network.VAE_DECODER
        assert (keys[0].digest() == keys[1].digest()) is same_shapes, network
    vae = PlanTarget(Network.VAE_DECODER, Precision.FP32)
    defaults = [
        plan_key(vae, graph_specs(dims)[vae.network], "ab" * 32, default_profiles(family), dims, settings,
                 "10.7.0", GPU).digest()
        for dims, family in ((SD15, "sd1"), (SDXL, "sdxl"))
    ]  # fmt: skip
    assert defaults[0] != defaults[1]  # the default profiles: 512 against 1024 px


# -- real plans (tensorrt and a GPU) -------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_xl_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-xl exported and built at a 64x64 static profile; skips before any work without TensorRT."""
    if not HAVE_TENSORRT:
        pytest.skip('tensorrt is not installed: pip install "sd-engine[tensorrt]"')
    from engine.tensorrt.env import check_environment

    try:
        check_environment()
    except MissingDependencyError as error:
        pytest.skip(str(error))
    from engine.build_trt import build_engine
    from engine.export import export_model
    from engine.models.presets import init_random

    root = tmp_path_factory.mktemp("trt-xl")
    model = init_random("tiny-xl", root / "model", seed=0)
    engine_dir = export_model(model, root / "engine").engine_dir
    profiles = (ShapeProfile.static(1, 64, 64),)
    settings = BuildSettings(profiles, tuple(Network), workspace_bytes=1 << 30, parity_seed=0)
    build_engine(engine_dir, settings)
    return engine_dir


@pytest.mark.tensorrt
def test_tiny_xl_plans_build_and_replay_with_bound_conditioning(trt_xl_engine: Path) -> None:
    """Every SDXL network gets a parity-gated plan (the VAE fp32 only), and the fused-guidance UNet
    replays its CUDA graph with text_embeds and time_ids bound as constants like the context."""
    import json

    from engine.runtime import bound, open_backend
    from engine.specs import axis_sizes, sample_inputs

    index = json.loads((trt_xl_engine / PLAN_DIR / INDEX_NAME).read_text())["networks"]
    assert index["text_encoder_2"] == {"plan": "text_encoder_2-fp16.plan", "fallback": None}
    assert index["vae_decoder"] == {"plan": "vae_decoder-fp32.plan", "fallback": None}
    manifest = read_manifest(trt_xl_engine)
    spec = manifest.graphs[Network.UNET_CFG].spec
    graphed = open_backend("tensorrt", trt_xl_engine, manifest, {"cuda_graph": True})(Network.UNET_CFG)
    plain = open_backend("tensorrt", trt_xl_engine, manifest, {"cuda_graph": False})(Network.UNET_CFG)
    rng = np.random.default_rng(3)
    feeds = sample_inputs(spec, axis_sizes(1, 8, 8, manifest.dims.vae_scale_factor), rng)
    constants = {k: v for k, v in feeds.items() if k not in ("sample", "timestep")}
    with bound(graphed, constants) as run:
        outputs = [run({"sample": feeds["sample"] + i, "timestep": feeds["timestep"]}) for i in range(3)]
    for i, output in enumerate(outputs):
        expected = plain.run({**feeds, "sample": feeds["sample"] + i})["guided_noise"]
        np.testing.assert_allclose(output["guided_noise"], expected, atol=1e-5)
    assert graphed.providers == ["tensorrt:cuda-graph"]
