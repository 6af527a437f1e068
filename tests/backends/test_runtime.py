"""ONNX Runtime backend: outputs against torch/numpy references, input checks, the optimized-graph cache."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engine.backends.onnxruntime import (
    CACHE_SIDECAR,
    CACHED_DATA,
    CACHED_MODEL,
    OnnxRuntimeBackend,
    OrtOptions,
    Provider,
    available_providers,
)
from engine.backends.options import CPU, CUDA
from engine.errors import EngineFolderError, MissingDependencyError
from engine.hashing import external_data_files, graph_content_hash
from engine.machine import physical_cores
from engine.specs import GraphSpec, ModelDims, Network, TensorSpec, unet_spec, vae_decoder_spec

DIMS = ModelDims(latent_channels=4, text_hidden_size=8)
TOL = {"rtol": 1e-5, "atol": 1e-5}


class TinyDecoder(torch.nn.Module):
    """Conv, spatial self-attention, conv, 8x upsampling: the op mix of a VAE decoder, tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.qkv = torch.nn.Linear(8, 24)
        self.conv_out = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latent)
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # one head: (b, 1, tokens, c)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = h + attended.transpose(1, 2).reshape(b, c, height, width)
        return torch.nn.functional.interpolate(self.conv_out(h), scale_factor=8, mode="nearest")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyDecoder, Path]:
    torch.manual_seed(0)
    module = TinyDecoder().eval()
    path = tmp_path_factory.mktemp("decoder") / "vae_decoder.onnx"
    batch, height, width = (torch.export.Dim(name) for name in ("batch", "latent_height", "latent_width"))
    torch.onnx.export(
        module,
        (torch.randn(2, 4, 5, 6),),
        str(path),
        input_names=["latent"],
        output_names=["image"],
        dynamo=True,
        opset_version=18,
        verbose=False,
        external_data=False,
        dynamic_shapes={"latent": {0: batch, 2: height, 3: width}},
    )
    return module, path


def _unet_like_model(seed: int) -> onnx.ModelProto:
    """noise_pred = sample * scale * timestep + mean(encoder_hidden_states): every UNet input matters."""
    scale = np.random.default_rng(seed).standard_normal((1, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["timestep", "axes123"], ["t4"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states", "axes12"], ["context"], keepdims=1),
        helper.make_node("Unsqueeze", ["context", "axes3"], ["context4"]),
        helper.make_node("Mul", ["sample", "scale"], ["scaled"]),
        helper.make_node("Mul", ["scaled", "t4"], ["timed"]),
        helper.make_node("Add", ["timed", "context4"], ["noise_pred"]),
    ]
    constants = [
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes123"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        numpy_helper.from_array(np.array([3], np.int64), "axes3"),
    ]
    latent = ["batch", 4, "latent_height", "latent_width"]
    graph = helper.make_graph(
        nodes,
        "unet_like",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, latent),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(
                "encoder_hidden_states", TensorProto.FLOAT, ["batch", "sequence", 8]
            ),
        ],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, latent)],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _unet_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "scale"))
    context = feeds["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None]
    return feeds["sample"] * scale * feeds["timestep"][:, None, None, None] + context


def _unet_feeds(rng: np.random.Generator, batch: int = 2, height: int = 3, width: int = 5) -> dict:
    return {
        "sample": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
        "timestep": rng.uniform(0, 999, batch).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 7, 8), dtype=np.float32),
    }


@pytest.fixture
def unet_file(tmp_path: Path) -> Path:
    path = tmp_path / "unet.onnx"
    onnx.save(_unet_like_model(seed=0), str(path))
    return path


def _conv_model_external(folder: Path, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A conv graph whose weights live in an external data file, like the 3.4 GB SD UNet's."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["latent", "weight", "bias"], ["image"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = folder / "conv.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="conv.onnx.data", size_threshold=8)
    return path, weight, bias


def _conv_reference(latent: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = torch.nn.functional.conv2d(torch.from_numpy(latent), torch.from_numpy(weight), padding=1)
    return (out + torch.from_numpy(bias)[None, :, None, None]).numpy()


CONV_SPEC = GraphSpec(
    Network.VAE_DECODER,
    inputs=(TensorSpec("latent", ("batch", 4, "h", "w"), "float32"),),
    outputs=(TensorSpec("image", ("batch", 3, "h", "w"), "float32"),),
)


def test_dynamo_export_matches_torch(decoder: tuple[TinyDecoder, Path], tmp_path: Path) -> None:
    module, path = decoder
    spec = vae_decoder_spec(DIMS)
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU))
    plain = backend.load(path, spec)
    cached = backend.load(path, spec, cache_dir=tmp_path)
    assert plain.providers == [Provider.CPU.value]
    rng = np.random.default_rng(1)
    for batch, height, width in [(1, 4, 4), (2, 3, 7)]:
        latent = rng.standard_normal((batch, 4, height, width), dtype=np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(latent)).numpy()
        for graph in (plain, cached):
            image = graph.run({"latent": latent})["image"]
            assert image.shape == (batch, 3, 8 * height, 8 * width)
            np.testing.assert_allclose(image, expected, **TOL)


def test_multi_input_graph_matches_numpy(unet_file: Path) -> None:
    graph = OnnxRuntimeBackend(OrtOptions(device=CPU, threads=1)).load(unet_file, unet_spec(DIMS))
    feeds = _unet_feeds(np.random.default_rng(2))
    out = graph.run(feeds)
    assert list(out) == ["noise_pred"]
    np.testing.assert_allclose(out["noise_pred"], _unet_reference(onnx.load(str(unet_file)), feeds), **TOL)


def _rename(feeds: dict) -> dict:
    feeds["latents"] = feeds.pop("sample")
    return feeds


def _drop_timestep(feeds: dict) -> dict:
    del feeds["timestep"]
    return feeds


def _float64(feeds: dict) -> dict:
    feeds["sample"] = feeds["sample"].astype(np.float64)
    return feeds


def _rank(feeds: dict) -> dict:
    feeds["sample"] = feeds["sample"][0]
    return feeds


def _fixed_dim(feeds: dict) -> dict:
    feeds["encoder_hidden_states"] = feeds["encoder_hidden_states"][..., :7]
    return feeds


def _batch_mismatch(feeds: dict) -> dict:
    feeds["timestep"] = np.concatenate([feeds["timestep"], feeds["timestep"][:1]])
    return feeds


@pytest.mark.parametrize(
    ("corrupt", "error", "names"),
    [
        (_rename, TypeError, "latents"),
        (_drop_timestep, TypeError, "timestep"),
        (_float64, TypeError, "'sample' must be float32"),
        (_rank, ValueError, "'sample'"),
        (_fixed_dim, ValueError, "'encoder_hidden_states' axis 2 must be 8"),
        (_batch_mismatch, ValueError, r"'timestep' axis 0 \(batch\)"),
    ],
)
def test_wrong_inputs_name_the_input(unet_file: Path, corrupt, error: type[Exception], names: str) -> None:
    graph = OnnxRuntimeBackend(OrtOptions(device=CPU)).load(unet_file, unet_spec(DIMS))
    feeds = corrupt(_unet_feeds(np.random.default_rng(3)))
    with pytest.raises(error, match=names):
        graph.run(feeds)


def test_cache_written_then_used(unet_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale, fresh = cache / ".tmp-killed", cache / ".tmp-another-process"  # staging a kill -9 left, one in use
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU))
    first = backend.load(unet_file, unet_spec(DIMS), cache_dir=cache)
    assert not stale.exists() and fresh.is_dir()
    fresh.rmdir()
    assert not first.cache_hit
    entry = first.loaded_from.parent
    assert entry.parent == cache and first.loaded_from.name == CACHED_MODEL
    sidecar = json.loads((entry / CACHE_SIDECAR).read_text())
    assert entry.name == f"unet-{sidecar['digest']}"
    assert sidecar["key"]["content_hash"] == graph_content_hash(unet_file)
    assert sidecar["key"]["onnxruntime"] == ort.__version__
    assert sidecar["key"]["provider"] == Provider.CPU.value
    assert sidecar["key"]["optimization"] == "ORT_ENABLE_ALL"
    assert sidecar["key"]["machine"]["machine"]
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no staging folder left behind

    second = backend.load(unet_file, unet_spec(DIMS), cache_dir=cache)
    assert second.cache_hit and second.loaded_from == first.loaded_from
    feeds = _unet_feeds(np.random.default_rng(4), batch=3)
    np.testing.assert_array_equal(second.run(feeds)["noise_pred"], first.run(feeds)["noise_pred"])
    reference = _unet_reference(onnx.load(str(unet_file)), feeds)
    np.testing.assert_allclose(second.run(feeds)["noise_pred"], reference, **TOL)


def test_content_change_makes_a_new_entry(unet_file: Path, tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU))
    cache = tmp_path / "cache"
    old = backend.load(unet_file, unet_spec(DIMS), cache_dir=cache)
    old_key = backend.cache_key(unet_file)
    changed = _unet_like_model(seed=1)
    onnx.save(changed, str(unet_file))
    new = backend.load(unet_file, unet_spec(DIMS), cache_dir=cache)
    assert backend.cache_key(unet_file).digest() != old_key.digest()
    assert not new.cache_hit and new.loaded_from != old.loaded_from
    assert len(list(cache.iterdir())) == 2
    feeds = _unet_feeds(np.random.default_rng(5))
    np.testing.assert_allclose(new.run(feeds)["noise_pred"], _unet_reference(changed, feeds), **TOL)


def test_manifest_hash_is_trusted_for_the_key(unet_file: Path) -> None:
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU))
    given = backend.cache_key(unet_file, content_hash="ab" * 32)
    assert given.content_hash == "ab" * 32
    assert given.digest() != backend.cache_key(unet_file).digest()


def _garble_model(entry: Path) -> None:
    path = entry / CACHED_MODEL
    path.write_bytes(b"\xff" * path.stat().st_size)  # same size: only ONNX Runtime notices


def _truncate_data(entry: Path) -> None:
    with open(entry / CACHED_DATA, "r+b") as handle:
        handle.truncate(10)


def _forge_key(entry: Path) -> None:
    sidecar = json.loads((entry / CACHE_SIDECAR).read_text())
    sidecar["key"]["onnxruntime"] = "0.0.0"
    (entry / CACHE_SIDECAR).write_text(json.dumps(sidecar))


@pytest.mark.parametrize("damage", [_garble_model, _truncate_data, _forge_key])
def test_damaged_cache_is_replaced(tmp_path: Path, damage) -> None:
    source, weight, bias = _conv_model_external(tmp_path, seed=0)
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU, external_min_bytes=8))
    cache = tmp_path / "cache"
    entry = backend.load(source, CONV_SPEC, cache_dir=cache).loaded_from.parent
    damage(entry)
    with pytest.warns(RuntimeWarning, match="damaged optimized-graph cache"):
        rebuilt = backend.load(source, CONV_SPEC, cache_dir=cache)
    assert not rebuilt.cache_hit and rebuilt.loaded_from.parent == entry
    latent = np.random.default_rng(6).standard_normal((2, 4, 5, 3), dtype=np.float32)
    np.testing.assert_allclose(
        rebuilt.run({"latent": latent})["image"], _conv_reference(latent, weight, bias), **TOL
    )
    assert backend.load(source, CONV_SPEC, cache_dir=cache).cache_hit


def test_external_data_model(tmp_path: Path) -> None:
    source, weight, bias = _conv_model_external(tmp_path, seed=0)
    assert external_data_files(source) == [tmp_path / "conv.onnx.data"]
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU, external_min_bytes=8))
    first = backend.load(source, CONV_SPEC, cache_dir=tmp_path / "cache")
    second = backend.load(source, CONV_SPEC, cache_dir=tmp_path / "cache")
    assert (first.loaded_from.parent / CACHED_DATA).stat().st_size > 0
    assert second.cache_hit
    latent = np.random.default_rng(7).standard_normal((1, 4, 6, 6), dtype=np.float32)
    expected = _conv_reference(latent, weight, bias)
    for graph in (first, second):
        np.testing.assert_allclose(graph.run({"latent": latent})["image"], expected, **TOL)

    before = graph_content_hash(source)
    data = bytearray((tmp_path / "conv.onnx.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "conv.onnx.data").write_bytes(bytes(data))
    assert graph_content_hash(source) != before  # weights count, not just the graph file


def test_unwritable_cache_loads_without_it(unet_file: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="engine.backends.onnxruntime"):
        graph = OnnxRuntimeBackend(OrtOptions(device=CPU)).load(
            unet_file, unet_spec(DIMS), cache_dir=blocker / "cache"
        )
    assert graph.loaded_from == unet_file and not graph.cache_hit
    assert "not writable" in caplog.text
    feeds = _unet_feeds(np.random.default_rng(8))
    np.testing.assert_allclose(
        graph.run(feeds)["noise_pred"], _unet_reference(onnx.load(str(unet_file)), feeds), **TOL
    )


def test_missing_graph_file(tmp_path: Path) -> None:
    with pytest.raises(EngineFolderError, match=r"nothing\.onnx"):
        OnnxRuntimeBackend(OrtOptions(device=CPU)).load(tmp_path / "nothing.onnx", CONV_SPEC)


@pytest.mark.parametrize("cached", [False, True])
def test_corrupt_graph_file(tmp_path: Path, cached: bool) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf\x00\x01\x02")
    backend = OnnxRuntimeBackend(OrtOptions(device=CPU))
    with pytest.raises(EngineFolderError, match=r"broken\.onnx") as raised:
        backend.load(path, CONV_SPEC, cache_dir=tmp_path / "cache" if cached else None)
    assert "\n" not in str(raised.value) and "INVALID_PROTOBUF" in str(raised.value)


def test_graph_not_matching_spec(unet_file: Path) -> None:
    with pytest.raises(EngineFolderError, match="does not match the vae_decoder spec"):
        OnnxRuntimeBackend(OrtOptions(device=CPU)).load(unet_file, CONV_SPEC)


@pytest.mark.skipif(Provider.CUDA.value in available_providers(), reason="onnxruntime-gpu is installed")
def test_cuda_without_onnxruntime_gpu() -> None:
    with pytest.raises(MissingDependencyError, match=r'pip install "sd-engine\[gpu\]"'):
        OnnxRuntimeBackend(OrtOptions(device=CUDA))
    assert OnnxRuntimeBackend().provider is Provider.CPU


def test_threads_default_to_physical_cores() -> None:
    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert OnnxRuntimeBackend(OrtOptions(device=CPU)).threads == cores
    assert OnnxRuntimeBackend(OrtOptions(device=CPU, threads=3)).threads == 3
