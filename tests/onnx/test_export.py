"""Export: graphs agree with diffusers' own modules at shapes the exporter never saw; the gate bites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from engine.backends.onnxruntime import OnnxRuntimeBackend
from engine.errors import ParityError
from engine.export import ExportSettings, export_model
from engine.hashing import graph_content_hash
from engine.manifest import FORMAT_VERSION, read_manifest
from engine.models.torch_modules import UNetWrapper
from engine.onnx.convert import parity_gate
from engine.parity import compare, rel_l2
from engine.specs import Network, Precision, unet_spec


def _graph(engine: Path, network: Network):
    manifest = read_manifest(engine)
    return OnnxRuntimeBackend().load(engine / manifest.graphs[network].file, manifest.graphs[network].spec)


def test_manifest_records_files_hashes_and_parity(tiny_engine: Path) -> None:
    manifest = read_manifest(tiny_engine)
    data = json.loads((tiny_engine / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert manifest.model_family == "sd1" and manifest.prediction_type == "epsilon"
    assert manifest.dims.vae_scale_factor == 8 and manifest.scaling_factor == pytest.approx(0.18215)
    assert set(manifest.graphs) == set(manifest.dims.networks)
    for entry in manifest.graphs.values():
        assert entry.parity["worst_rel_l2"] <= 1e-4
        assert len(entry.parity["checks"]) >= 2
        assert entry.exporter["opset"] == "18"
    assert (tiny_engine / "tokenizer" / "vocab.json").is_file()
    assert not list(tiny_engine.parent.glob(".*tmp*"))


def test_manifest_sha256_is_the_runtime_content_hash(tiny_engine: Path) -> None:
    """The TensorRT plan key and the ONNX Runtime cache compare this value with graph_content_hash."""
    variants = 0
    for entry in read_manifest(tiny_engine).graphs.values():
        assert entry.sha256 == graph_content_hash(tiny_engine / entry.file)
        if entry.onnxruntime is not None:
            variants += 1
            assert entry.onnxruntime.sha256 == graph_content_hash(tiny_engine / entry.onnxruntime.file)
            assert entry.onnxruntime.sha256 != entry.sha256
    assert variants >= 1  # the tiny UNet has attention, so its fused variant is checked too


@pytest.mark.parametrize("shape", [(1, 5, 3), (3, 13, 11), (2, 16, 24)])
def test_unet_matches_diffusers_at_any_latent_size(tiny_model: Path, tiny_engine: Path, shape) -> None:
    batch, height, width = shape
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    sample = torch.randn(batch, 4, height, width)
    timestep = torch.rand(batch) * 999
    context = torch.randn(batch, 77 * (1 + batch % 2), unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample, timestep, context).sample.numpy()
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    actual = _graph(tiny_engine, Network.UNET).run(feeds)["noise_pred"]
    assert actual.shape == expected.shape
    assert rel_l2(expected, actual) < 1e-5


def test_text_encoder_matches_transformers(tiny_model: Path, tiny_engine: Path) -> None:
    model = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 77))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    actual = _graph(tiny_engine, Network.TEXT_ENCODER).run({"input_ids": ids.numpy()})
    assert rel_l2(out.last_hidden_state.numpy(), actual["last_hidden_state"]) < 1e-5
    layers = model.config.num_hidden_layers
    assert actual["normed_hidden_states"].shape == (3, layers, 77, model.config.hidden_size)
    for clip_skip in range(1, layers + 1):  # A1111's clip skip n: layer num_layers - n + 1, normed
        expected = model.final_layer_norm(out.hidden_states[-clip_skip]).detach().numpy()
        assert rel_l2(expected, actual["normed_hidden_states"][:, -clip_skip]) < 1e-5


def test_vae_matches_diffusers(tiny_model: Path, tiny_engine: Path) -> None:
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    latent = torch.randn(2, 4, 7, 10)
    image = torch.rand(1, 3, 40, 72) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latent).sample.numpy()
        posterior = vae.encode(image).latent_dist
    got_decoded = _graph(tiny_engine, Network.VAE_DECODER).run({"latent": latent.numpy()})["image"]
    got_posterior = _graph(tiny_engine, Network.VAE_ENCODER).run({"image": image.numpy()})
    assert got_decoded.shape == (2, 3, 56, 80)
    assert rel_l2(decoded, got_decoded) < 1e-5
    assert rel_l2(posterior.mean.numpy(), got_posterior["latent_mean"]) < 1e-5
    assert rel_l2(posterior.std.numpy(), got_posterior["latent_std"]) < 1e-5


def test_parity_gate_raises_with_numbers_on_other_weights(tiny_model: Path, tiny_engine: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    with torch.no_grad():
        unet.conv_out.bias.add_(0.05)  # a different model than the one exported
    manifest = read_manifest(tiny_engine)
    with pytest.raises(ParityError, match=r"unet: .*rel L2 \d\.\d+e[-+]\d+ > 1\.0e-04"):
        parity_gate(
            UNetWrapper(unet), unet_spec(manifest.dims), tiny_engine / "unet.onnx", manifest.dims, 1000, 1e-4
        )


def test_failed_export_leaves_nothing_behind(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "engine"
    settings = ExportSettings(networks=(Network.TEXT_ENCODER,), parity_threshold=0.0)
    with pytest.raises(ParityError, match="text_encoder"):
        export_model(tiny_model, target, settings)
    assert list(tmp_path.iterdir()) == []


def test_compare_reports_exact_numbers() -> None:
    expected = np.array([0.0, 1.0, 2.0, 3.0])
    report = compare(expected, expected + np.array([0.0, 0.0, 0.0, 0.5]), {"batch": 1})
    assert report.max_abs == pytest.approx(0.5)
    assert report.rel_l2 == pytest.approx(0.5 / np.sqrt(14))
    assert report.psnr_db == pytest.approx(10 * np.log10(9 / (0.25 / 4)))


def test_fp16_export_stores_half_weights_and_looser_parity(tiny_model: Path, tmp_path: Path) -> None:
    import onnx

    settings = ExportSettings(precision=Precision.FP16, networks=(Network.TEXT_ENCODER,))
    result = export_model(tiny_model, tmp_path / "fp16", settings)
    entry = result.manifest.graphs[Network.TEXT_ENCODER]
    assert entry.precision is Precision.FP16
    assert 0 < entry.parity["worst_rel_l2"] <= 2e-2
    model = onnx.load(str(tmp_path / "fp16" / entry.file))
    big = [t for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) >= 32]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT] * 2
