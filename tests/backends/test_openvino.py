"""The openvino backend: fp32 matches ONNX Runtime, bf16 stays within the 40 dB bar, errors are clear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.backends.onnxruntime import OnnxRuntimeBackend
from engine.errors import EngineError, EngineFolderError
from engine.manifest import read_manifest
from engine.parity import psnr, rel_l2
from engine.pipeline import Pipeline
from engine.runtime import open_backend
from engine.specs import Network, axis_sizes, sample_inputs

ov = pytest.importorskip("openvino", reason='openvino is not installed: pip install "sd-engine[openvino]"')
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(
    not HAS_BF16, reason="this CPU has no bfloat16 arithmetic (AMX / AVX512-BF16)"
)
SETTINGS = {
    "steps": 6,
    "width": 64,
    "height": 56,
    "seed": 21,
    "sampler": "DPM++ 2M Karras",
    "guidance_scale": 7.0,
}


@pytest.fixture(scope="module")
def reference(tiny_engine: Path) -> list:
    return Pipeline.load(tiny_engine).generate(["a red fox", "a boat"], "blurry", **SETTINGS).images


@pytest.mark.parametrize(
    ("precision", "limit"), [("fp32", 1e-4), pytest.param("bf16", 0.1, marks=needs_bf16)]
)
def test_every_graph_matches_onnxruntime(tiny_engine: Path, precision: str, limit: float) -> None:
    manifest = read_manifest(tiny_engine)
    load = open_backend("openvino", tiny_engine, manifest, {"precision": precision})
    rng = np.random.default_rng()
    for network, entry in manifest.graphs.items():
        graph = load(network)
        assert graph.providers == [f"openvino:CPU:{precision}"]
        feeds = sample_inputs(entry.spec, axis_sizes(2, 9, 7, 8, 154), rng)
        expected = OnnxRuntimeBackend().load(tiny_engine / entry.file, entry.spec).run(feeds)
        actual = graph.run(feeds)
        for name in entry.spec.output_names:
            assert actual[name].dtype == np.float32 and actual[name].shape == expected[name].shape
            # guided noise amplifies the two halves' differences by up to the scale (1..12 here)
            bound = limit * (3 if network is Network.UNET_CFG and precision == "bf16" else 1)
            assert rel_l2(expected[name], actual[name]) < bound, (network, name)


@pytest.mark.parametrize(
    ("precision", "min_psnr"), [("fp32", 60.0), pytest.param("bf16", 40.0, marks=needs_bf16)]
)
def test_images_match_the_fp32_pipeline(
    tiny_engine: Path, reference: list, precision: str, min_psnr: float
) -> None:
    pipe = Pipeline.load(tiny_engine, "openvino", precision=precision)
    images = pipe.generate(["a red fox", "a boat"], "blurry", **SETTINGS).images
    for image, expected in zip(images, reference, strict=True):
        assert psnr(expected, image, peak=255) >= min_psnr


def test_bad_options_are_one_line_errors(tiny_engine: Path) -> None:
    with pytest.raises(EngineError, match=r"bad openvino backend options .*precision: fp32, fp16, bf16"):
        Pipeline.load(tiny_engine, "openvino", precision="int4")
    with pytest.raises(EngineError, match=r"the openvino backend runs in bf16, fp32, not fp16"):
        Pipeline.load(tiny_engine, "openvino", precision="fp16")
    with pytest.raises(
        EngineError, match=r"bad openvino backend options .*valid: device, precision, threads, cache"
    ):
        Pipeline.load(tiny_engine, "openvino", provider="CPUExecutionProvider")


def test_a_graph_of_another_interface_is_refused(tiny_engine: Path, tmp_path: Path) -> None:
    engine = Path(shutil.copytree(tiny_engine, tmp_path / "e", ignore=shutil.ignore_patterns(".cache")))
    data = json.loads((engine / "manifest.json").read_text())
    data["graphs"]["vae_decoder"]["file"] = "text_encoder.onnx"  # wrong graph behind the vae_decoder spec
    (engine / "manifest.json").write_text(json.dumps(data))
    pipe_load = Pipeline.load
    with pytest.raises(EngineFolderError, match=r"text_encoder\.onnx does not match the vae_decoder spec"):
        pipe_load(engine, "openvino", precision="fp32")


def test_non_finite_outputs_raise_instead_of_making_black_images(tiny_engine: Path) -> None:
    manifest = read_manifest(tiny_engine)
    decoder = open_backend("openvino", tiny_engine, manifest, {"precision": "fp32"})(Network.VAE_DECODER)
    latent = np.full((1, 4, 8, 8), np.inf, np.float32)
    with pytest.raises(EngineError, match=r"vae_decoder: OpenVINO \(openvino:CPU:fp32\) returned non-finite"):
        decoder.run({"latent": latent})
