"""Attention fused into ONNX Runtime's MultiHeadAttention: same numbers, only where the pattern is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from engine.backends.onnxruntime import OnnxRuntimeBackend
from engine.errors import EngineFolderError
from engine.manifest import Variant, read_manifest
from engine.onnx.attention_fusion import CONTRIB_DOMAIN, write_fused
from engine.parity import rel_l2
from engine.pipeline import Pipeline
from engine.specs import Network


class Attention(torch.nn.Module):
    """Self- or cross-attention as diffusers writes it: projections, heads, SDPA, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        hidden = F.scaled_dot_product_attention(q, k, v)
        return self.out(hidden.transpose(1, 2).reshape(batch, -1, self.heads * q.shape[-1]))


def _export(module: torch.nn.Module, path: Path, dim: int) -> None:
    x, context = torch.randn(2, 24, dim), torch.randn(2, 11, dim)
    dynamic = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) * 2
    torch.onnx.export(module.eval(), (x, context), str(path), dynamo=True, opset_version=18,
                      input_names=["x", "context"], output_names=["y"], dynamic_shapes=dynamic)  # fmt: skip


@pytest.mark.parametrize(
    ("dim", "heads", "queries", "keys"), [(64, 4, 37, 37), (48, 1, 9, 77), (40, 8, 5, 3)]
)
def test_fused_attention_gives_the_same_numbers(
    tmp_path: Path, dim: int, heads: int, queries: int, keys: int
) -> None:
    module = Attention(dim, heads)
    _export(module, tmp_path / "a.onnx", dim)
    assert write_fused(tmp_path / "a.onnx", tmp_path / "a.ort.onnx") == 1
    fused = onnx.load(str(tmp_path / "a.ort.onnx"))
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
    (mha,) = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert mha.domain == CONTRIB_DOMAIN and onnx.helper.get_attribute_value(mha.attribute[0]) == heads
    x, context = torch.randn(3, queries, dim), torch.randn(3, keys, dim)
    with torch.no_grad():
        expected = module(x, context).numpy()
    session = ort.InferenceSession(str(tmp_path / "a.ort.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"x": x.numpy(), "context": context.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_attention_whose_probabilities_are_used_elsewhere_is_left_alone(tmp_path: Path) -> None:
    _export(Attention(32, 2), tmp_path / "a.onnx", 32)
    model = onnx.load(str(tmp_path / "a.onnx"))
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(softmax.output[0], onnx.TensorProto.FLOAT, None)
    )
    onnx.save(model, str(tmp_path / "b.onnx"))  # probabilities as a second output: fusing would compute twice
    assert write_fused(tmp_path / "b.onnx", tmp_path / "b.ort.onnx") == 0
    assert not (tmp_path / "b.ort.onnx").exists()
    assert write_fused(tmp_path / "a.onnx", tmp_path / "a.ort.onnx") == 1  # the same graph, unmodified


def test_graphs_without_plain_attention_get_no_variant(tiny_engine: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny_engine)
    assert write_fused(tiny_engine / "text_encoder.onnx", tmp_path / "t.onnx") == 0  # causal mask: not fused
    assert manifest.graphs[Network.TEXT_ENCODER].onnxruntime is None
    assert manifest.graphs[Network.VAE_DECODER].onnxruntime is None  # weights inline: no second copy


@pytest.mark.parametrize("shape", [(1, 5, 3), (2, 16, 24)])
def test_unet_variant_matches_diffusers(
    tiny_model: Path, tiny_engine: Path, shape: tuple[int, int, int]
) -> None:
    manifest = read_manifest(tiny_engine)
    variant = manifest.graphs[Network.UNET].onnxruntime
    assert variant is not None and variant.rewrite == "20 attentions -> com.microsoft.MultiHeadAttention"
    assert variant.parity["passed"] and variant.parity["worst_rel_l2"] <= 1e-4
    ops = [n.op_type for n in onnx.load(str(tiny_engine / variant.file)).graph.node]
    assert ops.count("MultiHeadAttention") == 20 and "Softmax" not in ops
    batch, height, width = shape
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    sample, timestep = torch.randn(batch, 4, height, width), torch.rand(batch) * 999
    context = torch.randn(batch, 154, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample, timestep, context).sample.numpy()
    graph = OnnxRuntimeBackend().load(tiny_engine / variant.file, manifest.graphs[Network.UNET].spec)
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    actual = graph.run(feeds)["noise_pred"]
    assert rel_l2(expected, actual) < 1e-5


def test_pipeline_runs_the_variant_unless_told_not_to(tiny_engine: Path) -> None:
    fused = Pipeline.load(tiny_engine)
    plain = Pipeline.load(tiny_engine, fused_attention=False)
    unet = Network.UNET_CFG
    assert Path(fused.graph(unet).loaded_from).parent.name != Path(plain.graph(unet).loaded_from).parent.name
    settings = {"steps": 4, "width": 64, "height": 64, "seed": 5, "sampler": "Euler a"}
    a = fused.generate("a castle", **settings).images[0]
    b = plain.generate("a castle", **settings).images[0]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_variant_round_trips_and_a_missing_variant_file_is_reported(
    tiny_engine: Path, tmp_path: Path
) -> None:
    variant = Variant("unet.ort.onnx", "ab" * 32, "2 attentions -> x", {"passed": True})
    assert Variant.from_json(json.loads(json.dumps(variant.to_json()))) == variant
    engine = Path(shutil.copytree(tiny_engine, tmp_path / "e", ignore=shutil.ignore_patterns(".cache")))
    (engine / "unet.ort.onnx").unlink()
    with pytest.raises(EngineFolderError, match=r"is missing unet\.ort\.onnx"):
        read_manifest(engine)
