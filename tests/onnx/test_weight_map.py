"""The LoRA weight map: export finds each torch weight's initializer by content, the runtime reads and
patches it by byte offset (inline) or external initializer (external data), and ONNX Runtime runs the
patched graph exactly like a graph re-saved with the new weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.onnxruntime import OnnxRuntimeBackend, Patch
from engine.backends.weights import base_weight, patched_model_bytes, stored_initializers
from engine.onnx.weight_map import initializer_locations, weight_map
from engine.specs import lora_target_name


def small_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (1, 3, 5, 5) -> Conv(3x3) -> Flatten -> MatMul(W^T of a Linear) -> y; weights in torch layout."""
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    linear = rng.standard_normal((6, 36)).astype(np.float32)  # torch Linear (out, in)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[0, 0, 0, 0]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "val_7"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(linear.T.copy(), "val_7")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    weights = {"unet:down_blocks.0.resnets.0.conv1": conv, "unet:down_blocks.0.attentions.0.proj_in": linear}
    return model, weights


def save(model: onnx.ModelProto, path: Path, external: bool) -> Path:
    if external:
        onnx.save(
            model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
        )
    else:
        onnx.save(model, str(path))
    return path


def run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_patched_graph_equals_a_graph_saved_with_the_new_weights(tmp_path: Path, external: bool) -> None:
    rng = np.random.default_rng(3)
    model, weights = small_model(rng)
    path = save(model, tmp_path / "g.onnx", external)
    on_disk = {file.name: file.read_bytes() for file in tmp_path.iterdir()}
    refs = weight_map(path, weights)
    assert set(refs) == set(weights)
    assert refs["unet:down_blocks.0.attentions.0.proj_in"].transposed
    assert not refs["unet:down_blocks.0.resnets.0.conv1"].transposed
    for target, value in weights.items():  # the memmap reads back exactly what export wrote
        np.testing.assert_array_equal(base_weight(tmp_path, refs[target]), value)

    new = {target: value * 1.5 + 0.25 for target, value in weights.items()}
    values = stored_initializers(tmp_path, refs, list(new), lambda target, base: new[target])
    if external:
        patch = Patch(None, {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in values.items()})
    else:
        patch = Patch(patched_model_bytes(path, {r.initializer: r for r in refs.values()}, values))
    backend = OnnxRuntimeBackend()
    session = backend._session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, patch=patch)
    kept = {name: value.copy() for name, value in values.items()}
    for value in values.values():  # ONNX Runtime copied what it was given: overwriting it changes nothing
        value[...] = 0
    del patch

    reference = onnx.load(str(path))
    for tensor in reference.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(kept[tensor.name], tensor.name))
    expected = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run(session, x), run(expected, x))
    base = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.abs(run(session, x) - run(base, x)).max() > 0.1  # the patch did change the output
    assert {file.name: file.read_bytes() for file in tmp_path.iterdir()} == on_disk  # files untouched


def test_weights_without_a_unique_initializer_are_left_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model, weights = small_model(rng)
    path = save(model, tmp_path / "g.onnx", external=False)
    twin = dict(
        weights, **{"unet:up_blocks.0.resnets.0.conv1": weights["unet:down_blocks.0.resnets.0.conv1"]}
    )
    refs = weight_map(path, twin)
    assert set(refs) == {"unet:down_blocks.0.attentions.0.proj_in"}  # two modules, one initializer: neither
    stored = {s.name: s for s in initializer_locations(path)}
    assert stored["conv_w"].dims == (4, 3, 3, 3) and stored["conv_w"].file == "g.onnx"


@pytest.mark.parametrize(
    ("parameter", "target"),
    [
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        ("unet.unet.conv_in.weight", "unet:conv_in"),  # the guidance wrapper nests the UNet wrapper
        (
            "inner.text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_encoder:encoder.layers.0.self_attn.q_proj",
        ),  # fp16 boundary, transformers 4 naming
        ("unet.conv_in.bias", None),
        ("vae.decoder.conv_in.weight", None),
    ],
)
def test_target_names(parameter: str, target: str | None) -> None:
    assert lora_target_name(parameter) == target
