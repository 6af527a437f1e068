"""ONNX Runtime through IO binding (static buffers per input shape) and ONNX Runtime's CUDA graph.

Every run is compared element-wise with a plain ``session.run`` of the same graph on fresh random
inputs. Here the binding path runs on the CPU provider; the CUDA provider and its CUDA graph run only
where onnxruntime-gpu sees a GPU (the test says so when it skips).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.onnxruntime import (
    GRAPH_ID_KEY,
    NO_GRAPH,
    BoundRunner,
    OnnxRuntimeBackend,
    OrtGraph,
    OrtOptions,
    Provider,
    _check_device_options,
    _load_error,
    _run_options,
)
from engine.backends.options import CPU, CUDA, Device, DeviceKind, Switch, parse_backend_options
from engine.errors import EngineError, EngineFolderError, MissingDependencyError
from engine.manifest import read_manifest
from engine.parity import rel_l2
from engine.specs import GraphSpec, Network, TensorSpec, axis_sizes, sample_inputs

HAVE_CUDA_EP = Provider.CUDA.value in ort.get_available_providers()
# A mark, not a fixture: the session-scoped tiny_engine would be built before a fixture could skip.
needs_cuda_ep = pytest.mark.skipif(
    not HAVE_CUDA_EP,
    reason=f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (have "
    f"{ort.get_available_providers()}): install onnxruntime-gpu on a CUDA machine",
)
CPU_BOUND = OrtOptions(device=CPU, io_binding=Switch.ON, threads=1)
TOL = {"rtol": 1e-6, "atol": 1e-6}

# mean = x @ W + b; std = exp(mean) * float(ids): two inputs (float32, int64), two outputs, batch dynamic.
SPEC = GraphSpec(
    Network.VAE_ENCODER,
    inputs=(TensorSpec("image", ("batch", 6), "float32"), TensorSpec("ids", ("batch",), "int64")),
    outputs=(
        TensorSpec("latent_mean", ("batch", 4), "float32"),
        TensorSpec("latent_std", ("batch", 4), "float32"),
    ),
)


def _model(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["image", "weight"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["latent_mean"]),
        helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_float", "axis1"], ["ids_column"]),
        helper.make_node("Exp", ["latent_mean"], ["exp_mean"]),
        helper.make_node("Mul", ["exp_mean", "ids_column"], ["latent_std"]),
    ]
    constants = [
        numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "weight"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "bound",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 6]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("latent_mean", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("latent_std", TensorProto.FLOAT, ["batch", 4]),
        ],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "bound.onnx"
    onnx.save(_model(seed=0), str(path))
    return path


def _feeds(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    return {
        "image": rng.standard_normal((batch, 6), dtype=np.float32),
        "ids": rng.integers(0, 5, size=batch, dtype=np.int64),
    }


def _reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same graph through a fresh plain session.run, the path without IO binding."""
    session = ort.InferenceSession(str(path), providers=[Provider.CPU.value])
    return dict(zip(SPEC.output_names, session.run(SPEC.output_names, feeds), strict=True))


def _assert_matches(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(outputs) == SPEC.output_names
    for name in SPEC.output_names:
        assert outputs[name].dtype == expected[name].dtype
        np.testing.assert_allclose(outputs[name], expected[name], **TOL)


def _runner(graph: OrtGraph) -> BoundRunner:
    assert graph.runner is not None
    return graph.runner


def _pointers(values: dict[str, ort.OrtValue]) -> dict[str, int]:
    return {name: value.data_ptr() for name, value in values.items()}


def test_binding_defaults_follow_the_provider(model_file: Path) -> None:
    assert OnnxRuntimeBackend(OrtOptions(device=CPU)).load(model_file, SPEC).runner is None
    graph = OnnxRuntimeBackend(CPU_BOUND).load(model_file, SPEC)
    runner = _runner(graph)
    assert (runner.device_type, runner.device_id, runner.cuda_graph) == ("cpu", 0, False)
    assert runner.current is None  # nothing is allocated before the first run


def test_bound_runs_match_session_run(model_file: Path) -> None:
    graph = OnnxRuntimeBackend(CPU_BOUND).load(model_file, SPEC)
    rng = np.random.default_rng(1)
    for batch in (2, 2, 2, 5, 5, 2):
        feeds = _feeds(rng, batch)
        _assert_matches(graph.run(feeds), _reference(model_file, feeds))
    strided = {"image": np.asfortranarray(rng.standard_normal((3, 6), dtype=np.float32)), "ids": np.arange(3)}
    _assert_matches(graph.run(strided), _reference(model_file, strided))


def test_first_run_learns_output_shapes_then_binds_static_outputs(model_file: Path) -> None:
    graph = OnnxRuntimeBackend(CPU_BOUND).load(model_file, SPEC)
    out = graph.run(_feeds(np.random.default_rng(2), batch=3))
    bound = _runner(graph).current
    assert bound is not None and bound.graph_id is None
    assert list(bound.inputs) == SPEC.input_names and list(bound.outputs) == SPEC.output_names
    assert {name: tuple(value.shape()) for name, value in bound.outputs.items()} == {
        name: array.shape for name, array in out.items()
    }
    assert [value.device_name() for value in bound.outputs.values()] == ["cpu", "cpu"]


def test_buffers_are_reused_within_a_shape_and_dropped_on_a_new_one(model_file: Path) -> None:
    graph = OnnxRuntimeBackend(CPU_BOUND).load(model_file, SPEC)
    runner = _runner(graph)
    rng = np.random.default_rng(3)
    graph.run(_feeds(rng, batch=2))
    first = runner.current
    assert first is not None
    old_values = {**first.inputs, **first.outputs}  # held, so a new buffer cannot reuse their memory
    pointers = _pointers(old_values)
    for _ in range(3):
        feeds = _feeds(rng, batch=2)
        _assert_matches(graph.run(feeds), _reference(model_file, feeds))
        assert runner.current is first
        assert _pointers({**first.inputs, **first.outputs}) == pointers
    dropped = weakref.ref(first)
    del first
    feeds = _feeds(rng, batch=4)
    _assert_matches(graph.run(feeds), _reference(model_file, feeds))
    gc.collect()
    assert dropped() is None  # the runner let go of the previous shape's binding
    current = runner.current
    assert current is not None
    new_pointers = _pointers({**current.inputs, **current.outputs})
    assert not set(new_pointers.values()) & set(pointers.values())
    assert current.inputs["image"].shape() == [4, 6] and current.outputs["latent_std"].shape() == [4, 4]


def test_outputs_are_copies_the_caller_owns(model_file: Path) -> None:
    graph = OnnxRuntimeBackend(CPU_BOUND).load(model_file, SPEC)
    rng = np.random.default_rng(4)
    feeds = _feeds(rng, batch=2)
    kept_feeds = {name: value.copy() for name, value in feeds.items()}
    graph.run(feeds)  # the first run of a shape takes the other path: check the bound path
    first = graph.run(feeds)
    first_copy = {name: value.copy() for name, value in first.items()}
    bound = _runner(graph).current
    assert bound is not None
    for name, value in first.items():
        assert not np.shares_memory(value, bound.outputs[name].numpy())
        value += 100.0  # the caller scribbles on what it got
    again = graph.run(feeds)
    _assert_matches(again, first_copy)
    later = graph.run(_feeds(rng, batch=2))
    for name in SPEC.output_names:
        np.testing.assert_array_equal(first[name], first_copy[name] + 100.0)  # a later run changed nothing
        assert not np.array_equal(later[name], again[name])
    for name, value in feeds.items():
        np.testing.assert_array_equal(value, kept_feeds[name])  # inputs are read, never written


def test_cached_graph_runs_bound_and_shares_the_cache_key(model_file: Path, tmp_path: Path) -> None:
    bound_backend = OnnxRuntimeBackend(CPU_BOUND)
    plain_backend = OnnxRuntimeBackend(OrtOptions(device=CPU, threads=1))
    assert bound_backend.cache_key(model_file) == plain_backend.cache_key(model_file)
    made = bound_backend.load(model_file, SPEC, cache_dir=tmp_path / "cache")
    reused = bound_backend.load(model_file, SPEC, cache_dir=tmp_path / "cache")
    assert (made.cache_hit, reused.cache_hit) == (False, True)
    feeds = _feeds(np.random.default_rng(5), batch=3)
    for graph in (made, reused, made):
        _assert_matches(graph.run(feeds), _reference(model_file, feeds))


def test_graph_mode_bookkeeping_on_the_cpu(model_file: Path) -> None:
    """The CUDA-graph bookkeeping without a GPU: an id per shape, buffers kept for a shape coming back.

    The CPU provider ignores gpu_graph_id, so this checks the runner, not ONNX Runtime's capture.
    """
    session = ort.InferenceSession(str(model_file), providers=[Provider.CPU.value])
    runner = BoundRunner(session, SPEC.output_names, "cpu", cuda_graph=True)
    rng = np.random.default_rng(6)
    shapes = {}
    for batch in (2, 2, 3, 3, 2, 3):
        feeds = _feeds(rng, batch)
        _assert_matches(runner.run(feeds), _reference(model_file, feeds))
        bound = runner.current
        assert bound is not None
        shapes.setdefault(batch, (bound, _pointers({**bound.inputs, **bound.outputs})))
        assert bound is shapes[batch][0]
        assert _pointers({**bound.inputs, **bound.outputs}) == shapes[batch][1]
    assert [shapes[batch][0].graph_id for batch in (2, 3)] == [1, 2]
    assert [shapes[batch][0].run_options.get_run_config_entry(GRAPH_ID_KEY) for batch in (2, 3)] == ["1", "2"]


def test_run_options_carry_the_graph_id() -> None:
    assert _run_options(NO_GRAPH).get_run_config_entry(GRAPH_ID_KEY) == "-1"
    assert _run_options(7).get_run_config_entry(GRAPH_ID_KEY) == "7"
    with pytest.raises(RuntimeError):  # no entry at all without a CUDA graph
        _run_options(None).get_run_config_entry(GRAPH_ID_KEY)


def test_cuda_graph_on_the_cpu_is_refused() -> None:
    with pytest.raises(EngineError, match=r"cuda_graph needs device cuda \(CUDAExecutionProvider\), not CPU"):
        OnnxRuntimeBackend(OrtOptions(device=CPU, cuda_graph=Switch.ON))
    with pytest.raises(EngineError, match="cuda_graph needs device cuda"):
        OnnxRuntimeBackend(OrtOptions(device=CPU, io_binding=Switch.ON, cuda_graph=Switch.ON))


def test_cuda_graph_without_io_binding_is_refused() -> None:
    with pytest.raises(EngineError, match="cuda_graph needs io_binding"):
        _check_device_options(Provider.CUDA, io_binding=False, cuda_graph=True)
    _check_device_options(Provider.CUDA, io_binding=True, cuda_graph=True)  # the same with binding is fine


def test_device_must_be_cpu_or_a_cuda_device() -> None:
    with pytest.raises(EngineError, match="device 'cpu:1' is not cpu, cuda or cuda:N"):
        parse_backend_options(OrtOptions, {"device": "cpu:1"}, "onnxruntime")
    with pytest.raises(EngineError, match="device 'cuda:-1'"):
        parse_backend_options(OrtOptions, {"device": "cuda:-1"}, "onnxruntime")
    assert parse_backend_options(OrtOptions, {"device": "cuda:1"}, "onnxruntime").device == Device(
        DeviceKind.CUDA, 1
    )


@pytest.mark.skipif(HAVE_CUDA_EP, reason="this onnxruntime has the CUDA provider")
def test_cuda_graph_asks_for_cuda_and_says_it_is_missing() -> None:
    with pytest.raises(MissingDependencyError, match="CUDAExecutionProvider is not available"):
        OnnxRuntimeBackend(OrtOptions(cuda_graph=Switch.ON))


def test_refused_capture_is_not_a_damaged_file(tmp_path: Path) -> None:
    refusal = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the CUDA Graph feature as requested by the "
        "user as all compute graph nodes have not been partitioned to the CUDA EP."
    )
    error = _load_error(tmp_path / "unet.onnx", refusal, cuda_graph=True)
    assert type(error) is EngineError
    assert "cannot run" in str(error) and "cuda_graph=False" in str(error) and "\n" not in str(error)
    assert type(_load_error(tmp_path / "unet.onnx", refusal, cuda_graph=False)) is EngineFolderError
    garbled = RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model failed")
    assert type(_load_error(tmp_path / "unet.onnx", garbled, cuda_graph=True)) is EngineFolderError


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(CPU_BOUND, id="cpu-iobinding"),
        pytest.param(
            OrtOptions(device=CUDA, cuda_graph=Switch.ON),
            id="cuda-graph",
            marks=[needs_cuda_ep, pytest.mark.gpu],
        ),
    ],
)
def test_tiny_unet_bound_matches_plain_cpu(tiny_engine: Path, options: OrtOptions) -> None:
    """A real exported UNet: bound runs (and CUDA-graph replays) against plain CPU session.run."""
    manifest = read_manifest(tiny_engine)
    entry = manifest.graphs[Network.UNET]
    plain = OnnxRuntimeBackend(OrtOptions(device=CPU)).load(tiny_engine / entry.file, entry.spec)
    bound = OnnxRuntimeBackend(options).load(tiny_engine / entry.file, entry.spec)
    runner = _runner(bound)
    # Accelerated fp32 differs from the CPU in rounding (TF32 is ONNX Runtime's CUDA default).
    tolerance = 1e-5 if options.device == CPU else 1e-2
    rng = np.random.default_rng(7)
    pointers: dict[int, dict[str, int]] = {}
    previous = 0
    for batch in (2, 2, 2, 1, 1, 2):
        sizes = axis_sizes(batch, 8, 8, manifest.dims.vae_scale_factor, manifest.dims.text_max_length)
        feeds = sample_inputs(entry.spec, sizes, rng)
        expected = plain.run(feeds)["noise_pred"]
        got = bound.run(feeds)["noise_pred"]
        assert got.shape == expected.shape
        relative = rel_l2(expected, got)
        assert relative < tolerance, f"batch {batch}: relative L2 {relative:.2e}"
        current = runner.current
        assert current is not None
        now = _pointers({**current.inputs, **current.outputs})
        if batch == previous:
            assert now == pointers[batch]
        if runner.cuda_graph:  # captured graphs keep their buffers: a shape coming back finds them
            assert pointers.get(batch, now) == now
            assert current.graph_id == {2: 1, 1: 2}[batch]
        pointers[batch], previous = now, batch
