"""The fused-guidance UNet graph (unet_cfg): diffusers' UNet + guidance, shared weights, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import UNet2DConditionModel

from engine.backends.onnxruntime import OnnxRuntimeBackend
from engine.errors import EngineError
from engine.export import ExportSettings
from engine.manifest import read_manifest
from engine.onnx.cfg_graph import derive_cfg_graph
from engine.parity import rel_l2
from engine.pipeline import Pipeline
from engine.specs import ModelDims, Network, unet_cfg_spec, unet_spec


def _load(path: Path, network: Network, dims: ModelDims):
    spec = unet_cfg_spec(dims) if network is Network.UNET_CFG else unet_spec(dims)
    return OnnxRuntimeBackend().load(path, spec)


@pytest.mark.parametrize(("batch", "height", "width", "chunks"), [(1, 5, 3, 1), (2, 13, 11, 2)])
def test_fused_graph_matches_diffusers_unet_then_guidance(
    tiny_model: Path,
    tiny_engine: Path,
    batch: int,
    height: int,
    width: int,
    chunks: int,
    rng: np.random.Generator,
) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    sample = torch.from_numpy(rng.standard_normal((batch, 4, height, width), dtype=np.float32))
    timestep = torch.from_numpy(rng.uniform(0, 999, batch).astype(np.float32))
    context_shape = (2 * batch, 77 * chunks, unet.config.cross_attention_dim)
    context = torch.from_numpy(rng.standard_normal(context_shape, dtype=np.float32))
    scale = float(rng.uniform(1.5, 12))
    with torch.no_grad():
        both = unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]), context).sample.numpy()
    uncond, text = np.split(both.astype(np.float64), 2)
    expected = uncond + scale * (text - uncond)
    manifest = read_manifest(tiny_engine)
    graph = _load(tiny_engine / manifest.graphs[Network.UNET_CFG].file, Network.UNET_CFG, manifest.dims)
    feeds = {
        "sample": sample.numpy(),
        "timestep": timestep.numpy(),
        "encoder_hidden_states": context.numpy(),
        "guidance_scale": np.array([scale], np.float32),
    }
    actual = graph.run(feeds)["guided_noise"]
    assert actual.shape == (batch, 4, height, width)
    assert rel_l2(expected, actual) < 1e-4
    entry = manifest.graphs[Network.UNET_CFG]
    assert entry.parity["passed"] and entry.spec == unet_cfg_spec(manifest.dims)


def test_fused_graph_refers_to_the_unet_weights_file(
    tiny_engine: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    """With external weights (every SD-size UNet), unet_cfg.onnx holds no weights of its own."""
    dims = read_manifest(tiny_engine).dims
    model = onnx.load(str(tiny_engine / "unet.onnx"))
    onnx.save_model(model, str(tmp_path / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data",
                    size_threshold=1024)  # fmt: skip
    derive_cfg_graph(tmp_path / "unet.onnx", tmp_path / "unet_cfg.onnx", unet_spec(dims), unet_cfg_spec(dims))
    # no second copy of the weights: the graph is about the size of unet.onnx without its data file
    assert (tmp_path / "unet_cfg.onnx").stat().st_size < (tmp_path / "unet.onnx").stat().st_size + 65536
    fused = onnx.load(str(tmp_path / "unet_cfg.onnx"), load_external_data=False)
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"unet.onnx.data"}
    assert [v.name for v in fused.graph.input] == unet_cfg_spec(dims).input_names
    feeds = {
        "sample": rng.standard_normal((2, 4, 6, 5), dtype=np.float32),
        "timestep": rng.uniform(0, 999, 2).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((4, 77, dims.text_hidden_size), dtype=np.float32),
        "guidance_scale": np.array([7.5], np.float32),
    }
    plain = _load(tmp_path / "unet.onnx", Network.UNET, dims).run({
        "sample": np.concatenate([feeds["sample"]] * 2),
        "timestep": np.concatenate([feeds["timestep"]] * 2),
        "encoder_hidden_states": feeds["encoder_hidden_states"],
    })["noise_pred"]  # fmt: skip
    uncond, text = np.split(plain, 2)
    guided = _load(tmp_path / "unet_cfg.onnx", Network.UNET_CFG, dims).run(feeds)["guided_noise"]
    np.testing.assert_allclose(guided, uncond + np.float32(7.5) * (text - uncond), rtol=1e-4, atol=1e-5)


def test_context_batch_must_be_twice_the_latents(tiny_engine: Path) -> None:
    manifest = read_manifest(tiny_engine)
    graph = _load(tiny_engine / "unet_cfg.onnx", Network.UNET_CFG, manifest.dims)
    feeds = {
        "sample": np.zeros((2, 4, 8, 8), np.float32),
        "timestep": np.zeros(2, np.float32),
        "encoder_hidden_states": np.zeros((2, 77, manifest.dims.text_hidden_size), np.float32),
        "guidance_scale": np.ones(1, np.float32),
    }
    with pytest.raises(ValueError, match=r"unet_cfg: guidance needs 2 x 2 embeddings .* got 2"):
        graph.run(feeds)


def test_deriving_from_a_graph_that_is_not_a_unet_fails_clearly(tiny_engine: Path, tmp_path: Path) -> None:
    dims = read_manifest(tiny_engine).dims
    with pytest.raises(EngineError, match=r"cannot fuse guidance: the UNet graph has inputs \['latent'\]"):
        derive_cfg_graph(
            tiny_engine / "vae_decoder.onnx", tmp_path / "x.onnx", unet_spec(dims), unet_cfg_spec(dims)
        )
    assert not (tmp_path / "x.onnx").exists()


def test_export_needs_the_unet_for_unet_cfg() -> None:
    with pytest.raises(EngineError, match="unet_cfg graph is derived from the unet graph"):
        ExportSettings(networks=(Network.UNET_CFG,))
    assert ExportSettings(networks=(Network.UNET_CFG, Network.UNET)).networks == (
        Network.UNET,
        Network.UNET_CFG,
    )


SETTINGS = {"steps": 5, "width": 64, "height": 56, "seed": 11, "sampler": "DPM++ 2M Karras"}


def test_fused_and_host_guidance_make_the_same_image(tiny_engine: Path) -> None:
    fused = Pipeline.load(tiny_engine)
    host = Pipeline.load(tiny_engine, fused_cfg=False)
    assert Network.UNET_CFG in fused._graphs and Network.UNET not in fused._graphs
    assert Network.UNET in host._graphs and Network.UNET_CFG not in host._graphs
    a = fused.generate(["a red fox", "a boat"], ["blurry", ""], guidance_scale=9.0, **SETTINGS)
    b = host.generate(["a red fox", "a boat"], ["blurry", ""], guidance_scale=9.0, **SETTINGS)
    assert np.abs(a.latents - b.latents).max() < 1e-3 * np.abs(b.latents).max()
    for x, y in zip(a.images, b.images, strict=True):
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1


def test_guidance_off_and_rescale_run_the_plain_unet(tiny_engine: Path) -> None:
    pipe = Pipeline.load(tiny_engine)
    pipe.generate("a red fox", guidance_scale=1.0, **SETTINGS)
    assert Network.UNET in pipe._graphs  # loaded on demand
    rescaled = pipe.generate("a red fox", guidance_scale=7.0, guidance_rescale=0.7, **SETTINGS)
    host = Pipeline.load(tiny_engine, fused_cfg=False).generate(
        "a red fox", guidance_scale=7.0, guidance_rescale=0.7, **SETTINGS
    )
    np.testing.assert_array_equal(rescaled.latents, host.latents)


def test_requiring_fused_guidance_on_an_older_engine_folder_fails_clearly(
    tiny_engine: Path, tmp_path: Path
) -> None:
    old = Path(shutil.copytree(tiny_engine, tmp_path / "old", ignore=shutil.ignore_patterns(".cache")))
    data = json.loads((old / "manifest.json").read_text())
    del data["graphs"]["unet_cfg"]
    (old / "unet_cfg.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(data))
    assert not Pipeline.load(old).fused_cfg  # automatic: the plain UNet
    with pytest.raises(EngineError, match=r"has no unet_cfg graph for fused guidance; re-export"):
        Pipeline.load(old, fused_cfg=True)
