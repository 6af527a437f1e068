"""GPU backends: the CUDA-graph wrapper, fused guidance, torch on CUDA, TensorRT plans and runtime.

The first part runs everywhere (the wrapper's bookkeeping over NumPy buffers, fused guidance on the
CPU, the error paths). Tests marked ``gpu`` need torch with CUDA, tests marked ``tensorrt`` need
tensorrt, cuda-python and a GPU; each skips with the reason when those are missing.
`benchmarks/gpu.sh` runs them on a CUDA machine.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backends.cuda_graph import CudaGraphRunner, GuardedGraph, graph_providers, shape_key
from engine.errors import EngineError, EngineFolderError, MissingDependencyError
from engine.manifest import Manifest, read_manifest
from engine.parity import psnr, rel_l2
from engine.runtime import bound, open_backend
from engine.specs import GraphSpec, ModelDims, Network, TensorSpec, graph_specs, unet_spec
from tests.backends.marks import cuda_skip_reason, needs_cuda

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


needs_tensorrt = pytest.mark.skipif(
    not HAVE_TENSORRT, reason='tensorrt is not installed: pip install "sd-engine[tensorrt]"'
)


# -- the CUDA-graph wrapper, on NumPy buffers ---------------------------------------------------


class RecordingOps:
    """GraphOps over NumPy buffers: y = 2 x + b. A "graph" is bound to the buffers it was captured on,
    as a CUDA graph is bound to device addresses, so a runner that reallocated without dropping its
    graph would replay on freed buffers and fail here."""

    spec = GraphSpec(
        Network.UNET,
        inputs=(TensorSpec("x", ("rows", 3), "float32"), TensorSpec("b", (3,), "float32")),
        outputs=(TensorSpec("y", ("rows", 3), "float32"),),
    )

    def __init__(self, capture_error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.capture_error = capture_error

    def allocate(self, shapes: Mapping[str, tuple[int, ...]], constants: frozenset[str]) -> dict[str, Any]:
        self.calls.append("allocate")
        return {
            "in": {name: np.full(shape, np.nan, np.float32) for name, shape in shapes.items()},
            "out": {"y": np.full(shapes["x"], np.nan, np.float32)},
            "freed": False,
        }

    def release(self, buffers: dict[str, Any]) -> None:
        self.calls.append("release")
        buffers["freed"] = True

    def write_inputs(self, buffers: dict[str, Any], feeds: Mapping[str, np.ndarray]) -> None:
        for name, value in feeds.items():
            np.copyto(buffers["in"][name], value)

    def write_constants(self, buffers: dict[str, Any], constants: Mapping[str, np.ndarray]) -> None:
        self.calls.append(f"constants {sorted(constants)}")
        self.write_inputs(buffers, constants)

    def launch(self, buffers: dict[str, Any]) -> None:
        self.calls.append("launch")
        self._compute(buffers)

    def capture(self, buffers: dict[str, Any]) -> dict[str, Any]:
        self.calls.append("capture")
        if self.capture_error is not None:
            raise self.capture_error
        return {"buffers": buffers, "alive": True}

    def replay(self, graph: dict[str, Any]) -> None:
        self.calls.append("replay")
        assert graph["alive"] and not graph["buffers"]["freed"], "replayed a dropped graph or freed buffers"
        self._compute(graph["buffers"])

    def release_graph(self, graph: dict[str, Any]) -> None:
        self.calls.append("release_graph")
        graph["alive"] = False

    def read_outputs(self, buffers: dict[str, Any]) -> dict[str, np.ndarray]:
        return buffers["out"]

    @staticmethod
    def _compute(buffers: dict[str, Any]) -> None:
        np.multiply(buffers["in"]["x"], 2, out=buffers["out"]["y"])
        buffers["out"]["y"] += buffers["in"]["b"]


def _feeds(rng: np.random.Generator, rows: int = 2) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((rows, 3), dtype=np.float32),
        "b": rng.standard_normal(3, dtype=np.float32),
    }


def test_runner_warms_up_captures_once_then_replays() -> None:
    rng = np.random.default_rng(0)
    ops = RecordingOps()
    runner = CudaGraphRunner(ops, warmup=2)
    for _ in range(5):
        feeds = _feeds(rng)
        out = runner.run(feeds)
        np.testing.assert_array_equal(out["y"], 2 * feeds["x"] + feeds["b"])
    assert ops.calls == ["allocate", "launch", "launch", "capture", "replay", "replay", "replay"]
    assert (runner.stats.launches, runner.stats.captures, runner.stats.replays) == (2, 1, 3)
    assert runner.captured


def test_outputs_are_views_of_static_buffers_until_the_next_run() -> None:
    rng = np.random.default_rng(1)
    runner = CudaGraphRunner(RecordingOps(), warmup=1)
    first_feeds, second_feeds = _feeds(rng), _feeds(rng)
    first = runner.run(first_feeds)["y"]
    kept = first.copy()
    second = runner.run(second_feeds)["y"]
    assert second is first  # the same static buffer ...
    np.testing.assert_array_equal(first, 2 * second_feeds["x"] + second_feeds["b"])  # ... overwritten
    np.testing.assert_array_equal(kept, 2 * first_feeds["x"] + first_feeds["b"])  # a copy survives


def test_shape_change_drops_the_graph_and_the_buffers() -> None:
    rng = np.random.default_rng(2)
    ops = RecordingOps()
    runner = CudaGraphRunner(ops, warmup=1)
    for rows in (2, 2, 2, 4, 4, 4, 2):
        feeds = _feeds(rng, rows)
        np.testing.assert_array_equal(runner.run(feeds)["y"], 2 * feeds["x"] + feeds["b"])
    assert ops.calls == [
        "allocate", "launch", "capture", "replay", "replay",
        "release_graph", "release", "allocate", "launch", "capture", "replay", "replay",
        "release_graph", "release", "allocate", "launch",
    ]  # fmt: skip
    assert runner.stats.dropped_graphs == 2 and runner.stats.allocations == 3


def test_dtype_is_part_of_the_shape_key() -> None:
    a = {"x": np.zeros((2, 3), np.float32)}
    assert shape_key(a) != shape_key({"x": np.zeros((2, 3), np.float16)})
    assert shape_key(a) == shape_key({"x": np.ones((2, 3), np.float32)})


def test_invalidate_keeps_buffers_and_recaptures_after_warmup() -> None:
    rng = np.random.default_rng(3)
    ops = RecordingOps()
    runner = CudaGraphRunner(ops, warmup=1)
    runner.run(_feeds(rng))
    runner.run(_feeds(rng))
    runner.invalidate()  # e.g. after the backend reallocated something the graph recorded
    assert not runner.captured
    feeds = _feeds(rng)
    np.testing.assert_array_equal(runner.run(feeds)["y"], 2 * feeds["x"] + feeds["b"])
    runner.run(_feeds(rng))
    assert ops.calls == [
        "allocate",
        "launch",
        "capture",
        "replay",
        "release_graph",
        "launch",
        "capture",
        "replay",
    ]
    runner.reset()
    assert ops.calls[-1] == "release" and runner.key is None


def test_disabled_runner_only_launches() -> None:
    rng = np.random.default_rng(4)
    ops = RecordingOps()
    runner = CudaGraphRunner(ops, warmup=1, enabled=False)
    for _ in range(3):
        runner.run(_feeds(rng))
    assert ops.calls == ["allocate", "launch", "launch", "launch"]


def test_a_network_that_cannot_be_captured_warns_once_and_launches() -> None:
    rng = np.random.default_rng(9)
    ops = RecordingOps(capture_error=RuntimeError("operation not permitted when stream is capturing"))
    runner = CudaGraphRunner(ops, warmup=1)
    with pytest.warns(RuntimeWarning, match="unet: CUDA graph capture failed .*not permitted"):
        for _ in range(4):
            feeds = _feeds(rng)
            np.testing.assert_array_equal(runner.run(feeds)["y"], 2 * feeds["x"] + feeds["b"])
    assert ops.calls == ["allocate", "launch", "capture", "launch", "launch", "launch"]
    assert not runner.enabled and not runner.captured


def test_warmup_is_required() -> None:
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphRunner(RecordingOps(), warmup=0)


def test_constants_are_written_once_per_bind_and_per_allocation() -> None:
    rng = np.random.default_rng(11)
    ops = RecordingOps()
    runner = CudaGraphRunner(ops, warmup=1)
    first = {"b": rng.standard_normal(3, dtype=np.float32)}
    runner.bind_constants(first)
    xs = [rng.standard_normal((2, 3), dtype=np.float32) for _ in range(3)]
    for x in xs:
        np.testing.assert_array_equal(runner.run({"x": x})["y"], 2 * x + first["b"])
    assert ops.calls.count("constants ['b']") == 1 and runner.stats.replays == 2
    assert runner.stats.bytes_in == first["b"].nbytes + sum(x.nbytes for x in xs)  # varying only per step
    second = {"b": rng.standard_normal(3, dtype=np.float32)}
    runner.bind_constants(second)  # the next generation: same shapes, new constants, same graph
    before = runner.stats.bytes_in
    np.testing.assert_array_equal(runner.run({"x": xs[0]})["y"], 2 * xs[0] + second["b"])
    assert runner.stats.bytes_in - before == second["b"].nbytes + xs[0].nbytes
    assert ops.calls.count("constants ['b']") == 2 and runner.stats.allocations == 1
    wide = rng.standard_normal((4, 3), dtype=np.float32)  # a new shape reallocates: constants go again
    np.testing.assert_array_equal(runner.run({"x": wide})["y"], 2 * wide + second["b"])
    assert ops.calls.count("constants ['b']") == 3 and runner.stats.allocations == 2


def test_constant_names_are_part_of_the_key() -> None:
    """The same shapes with b bound or fed each run are different buffers (a TensorRT graph records
    which inputs it copies)."""
    rng = np.random.default_rng(12)
    runner = CudaGraphRunner(RecordingOps(), warmup=1)
    feeds = _feeds(rng)
    runner.run(feeds)
    runner.bind_constants({"b": feeds["b"]})
    np.testing.assert_array_equal(runner.run({"x": feeds["x"]})["y"], 2 * feeds["x"] + feeds["b"])
    assert runner.stats.allocations == 2


def test_a_failed_capture_leaves_cuda_graph_out_of_the_providers() -> None:
    runner = CudaGraphRunner(RecordingOps(capture_error=RuntimeError("host sync in graph")), warmup=1)
    assert graph_providers("tensorrt", [runner], requested=True) == ["tensorrt:cuda-graph"]
    assert graph_providers("tensorrt", [runner], requested=False) == ["tensorrt"]
    rng = np.random.default_rng(13)
    runner.run(_feeds(rng))
    with pytest.warns(RuntimeWarning, match="capture failed"):
        runner.run(_feeds(rng))
    assert runner.capture_failed and not runner.replays_graphs
    assert graph_providers("tensorrt", [runner], requested=True) == ["tensorrt"]
    healthy = CudaGraphRunner(RecordingOps(), warmup=1)
    assert graph_providers("torch:cuda:0:fp16", [healthy, runner], requested=True) == ["torch:cuda:0:fp16"]


class _RunnerGraph:
    """A Graph over a CudaGraphRunner, as the tensorrt and torch-cuda graphs are."""

    spec = RecordingOps.spec

    def __init__(self, capture_error: Exception | None = None) -> None:
        self.runner = CudaGraphRunner(RecordingOps(capture_error), warmup=1)

    @property
    def providers(self) -> list[str]:
        return graph_providers("numpy", [self.runner], requested=True)

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        self.runner.bind_constants(constants)

    def unbind_constants(self) -> None:
        self.runner.unbind_constants()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self.runner.run(feeds).items()}


def test_guarded_graph_reports_what_runs_and_binds_both() -> None:
    primary, fallback = _RunnerGraph(RuntimeError("no capture")), _RunnerGraph()
    guarded = GuardedGraph(primary, fallback)
    assert guarded.providers == ["numpy:cuda-graph", "fp32-fallback"]
    rng = np.random.default_rng(14)
    b = rng.standard_normal(3, dtype=np.float32)
    with bound(guarded, {"b": b}) as run:
        assert primary.runner.constants and fallback.runner.constants
        run({"x": rng.standard_normal((2, 3), dtype=np.float32)})
        with pytest.warns(RuntimeWarning, match="capture failed"):
            run({"x": rng.standard_normal((2, 3), dtype=np.float32)})
    assert guarded.providers == ["numpy", "fp32-fallback"]
    assert not primary.runner.constants and not fallback.runner.constants


def test_bound_unbinds_on_error_and_merges_for_plain_graphs() -> None:
    graph = _RunnerGraph()
    rng = np.random.default_rng(15)
    with pytest.raises(KeyboardInterrupt), bound(graph, {"b": rng.standard_normal(3, dtype=np.float32)}):
        raise KeyboardInterrupt  # a cancelled generation
    assert graph.runner.constants == {}
    plain = _ConstGraph(graph_specs(ModelDims())[Network.VAE_DECODER], 0.5)
    seen: list[dict[str, Any]] = []
    plain.run = lambda feeds: seen.append(dict(feeds)) or {}  # type: ignore[method-assign]
    with bound(plain, {"latent": 1}) as run:
        run({"extra": 2})
    assert seen == [{"latent": 1, "extra": 2}]


class _ConstGraph:
    def __init__(self, spec: GraphSpec, value: float) -> None:
        self.spec, self.value, self.providers, self.calls = spec, value, ["test"], 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"image": np.full((1, 3, 8, 8), self.value, np.float32)}


def test_guarded_graph_reruns_in_fp32_on_overflow() -> None:
    spec = graph_specs(ModelDims())[Network.VAE_DECODER]
    fp32 = _ConstGraph(spec, 0.5)
    finite = GuardedGraph(_ConstGraph(spec, 0.25), fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert finite.run({})["image"][0, 0, 0, 0] == 0.25
    assert fp32.calls == 0
    overflow = GuardedGraph(_ConstGraph(spec, np.inf), fp32)
    with pytest.warns(RuntimeWarning, match="overflowed; reran in fp32"):
        assert overflow.run({})["image"][0, 0, 0, 0] == 0.5
    assert overflow.fallbacks == 1 and overflow.providers == ["test", "fp32-fallback"]


# -- the tensorrt backend's pure parts ------------------------------------------------------------


def test_choose_profile() -> None:
    from engine.backends.tensorrt import choose_profile, describe_ranges

    ranges = [
        {"sample": ((2, 4, 64, 64), (2, 4, 64, 64))},
        {"sample": ((1, 4, 32, 32), (8, 4, 128, 128))},
    ]
    assert choose_profile(ranges, {"sample": (2, 4, 64, 64)}) == 0
    assert choose_profile(ranges, {"sample": (4, 4, 96, 40)}) == 1
    assert choose_profile(ranges, {"sample": (16, 4, 64, 64)}) is None
    assert choose_profile(ranges, {"sample": (2, 4, 64)}) is None
    assert describe_ranges(ranges[:1]) == "sample [2, 4, 64, 64]..[2, 4, 64, 64]"


def _sidecar_plan(tmp_path: Path, **key_changes: Any) -> tuple[Path, str]:
    from engine.build_trt import BuildSettings, ShapeProfile
    from engine.specs import Precision
    from engine.tensorrt.plans import GpuInfo, PlanTarget, plan_key, write_sidecar

    spec = unet_spec(ModelDims())
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    profiles = (ShapeProfile.static(1, 512, 512),)
    key = plan_key(PlanTarget(Network.UNET, Precision.FP16), spec, "ab" * 32, profiles, ModelDims(),
                   BuildSettings(), "10.7.0", gpu)  # fmt: skip
    plan = tmp_path / PLAN_DIR_NAME / "unet-fp16.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan bytes")
    write_sidecar(plan, dataclasses.replace(key, **key_changes), b"plan bytes", {"parity": {"passed": True}})
    return plan, "ab" * 32


PLAN_DIR_NAME = "tensorrt"


def test_runtime_refuses_plans_from_another_gpu_tensorrt_or_graph(tmp_path: Path) -> None:
    from engine.backends.tensorrt import read_plan
    from engine.tensorrt.plans import GpuInfo

    here = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    plan, sha = _sidecar_plan(tmp_path)
    assert read_plan(plan, sha, "10.7.0", here) == b"plan bytes"
    with pytest.raises(
        EngineFolderError, match=r"built with TensorRT 10.7.0 on NVIDIA H100.*sd-engine build"
    ):
        read_plan(plan, sha, "10.8.0", here)
    with pytest.raises(EngineFolderError, match=r"NVIDIA L4 \(compute 8.9\)"):
        read_plan(plan, sha, "10.7.0", GpuInfo("NVIDIA L4", "8.9"))
    with pytest.raises(EngineFolderError, match="the ONNX graph changed"):
        read_plan(plan, "cd" * 32, "10.7.0", here)
    plan.write_bytes(b"plan")
    with pytest.raises(EngineFolderError, match="truncated"):
        read_plan(plan, sha, "10.7.0", here)
    plan.with_name(plan.name + ".json").unlink()
    with pytest.raises(EngineFolderError, match="is missing"):
        read_plan(plan, sha, "10.7.0", here)


def test_runtime_refuses_a_plan_that_failed_parity(tmp_path: Path) -> None:
    from engine.backends.tensorrt import plan_load_problem
    from engine.tensorrt.plans import GpuInfo

    plan, sha = _sidecar_plan(tmp_path)
    sidecar = json.loads(plan.with_name(plan.name + ".json").read_text())
    here = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    assert plan_load_problem(sidecar, sha, "10.7.0", here) is None
    sidecar["parity"]["passed"] = False
    assert plan_load_problem(sidecar, sha, "10.7.0", here) == "it failed its parity gate"


def _manifest() -> Manifest:
    from engine.manifest import GraphEntry
    from engine.specs import Precision

    specs = graph_specs(ModelDims())
    graphs = {n: GraphEntry(f"{n.value}.onnx", "0" * 64, specs[n], Precision.FP32) for n in specs}
    return Manifest("sd15", "epsilon", ModelDims(), 0.18215, {}, graphs, source={"model_dir": "/nonexistent"})


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the missing-dependency path cannot happen")
def test_open_tensorrt_without_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r'pip install "sd-engine\[tensorrt\]"') as info:
        open_backend("tensorrt", tmp_path, _manifest())
    assert "\n" not in str(info.value)


def test_backend_options_are_checked() -> None:
    with pytest.raises(EngineError, match=r"bad tensorrt backend options .*valid: device, cuda_graph"):
        open_backend("tensorrt", Path("."), _manifest(), {"cuda_graphs": True})
    with pytest.raises(EngineError, match="bad torch-cuda backend options"):
        open_backend("torch-cuda", Path("."), _manifest(), {"graphs": True})
    with pytest.raises(EngineError, match=r"bad torch-cuda backend options .*precision: fp32, fp16, bf16"):
        open_backend("torch-cuda", Path("."), _manifest(), {"precision": "int4"})
    with pytest.raises(EngineError, match="the tensorrt backend runs on cuda, not cpu"):
        open_backend("tensorrt", Path("."), _manifest(), {"device": "cpu"})
    with pytest.raises(EngineError, match="the openvino backend runs on cpu, not cuda:1"):
        open_backend("openvino", Path("."), _manifest(), {"device": "cuda:1"})
    with pytest.raises(EngineError, match="cuda_graph: the torch backend runs on the CPU"):
        open_backend("torch", Path("."), _manifest(), {"cuda_graph": True})


@pytest.mark.skipif(
    cuda_skip_reason() is None, reason="CUDA is available: the missing-GPU path cannot happen"
)
def test_torch_cuda_without_a_gpu_is_one_line() -> None:
    with pytest.raises(MissingDependencyError, match="needs a CUDA GPU") as info:
        open_backend("torch-cuda", Path("."), _manifest())
    assert "\n" not in str(info.value)


# -- fused guidance and the fp16 boundary, on the CPU ----------------------------------------------


def test_fused_guidance_matches_the_pipeline(tiny_model: Path) -> None:
    """B latents + 2B embeddings + scale in, guided noise out == UNet on 2B then pipeline.guide()."""
    import torch

    from engine.models.folder import inspect_model_folder
    from engine.models.torch_modules import GuidedUNet, load_source_model
    from engine.pipeline.guidance import guide
    from engine.pipeline.request import GenerationRequest
    from engine.specs import unet_cfg_spec

    source = load_source_model(inspect_model_folder(tiny_model))
    unet = source.wrapper(Network.UNET)
    hidden = source.unet.config.cross_attention_dim
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2, 4, 8, 6), dtype=np.float32)
    timestep = np.full((2,), 481.0, np.float32)
    context = rng.standard_normal((4, 77, hidden), dtype=np.float32)
    request = GenerationRequest.create(["a", "b"], guidance_scale=6.5)
    with torch.no_grad():
        both = unet(
            *(torch.from_numpy(np.concatenate([a, a])) for a in (sample, timestep)), torch.from_numpy(context)
        )
        expected = guide(both.numpy(), request)
        scale = torch.tensor([6.5])
        fused = GuidedUNet(unet)(
            torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context), scale
        )
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-5, atol=1e-5)
    spec = unet_cfg_spec(ModelDims(text_hidden_size=hidden))
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", "guidance_scale"]
    assert spec.output_names == ["guided_noise"]


def test_cast_boundary_keeps_float32_at_the_edges() -> None:
    import torch

    from engine.backends.torch_cuda import cast_boundary

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.seen: list[torch.dtype] = []

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            self.seen = [sample.dtype, timestep.dtype, ids.dtype, self.weight.dtype]
            return sample * self.weight + timestep

    probe = Probe()
    module = cast_boundary(probe, torch.float64, keep_float32=(1,))
    out = module(torch.ones(2), torch.ones(2), torch.ones(2, dtype=torch.int64))
    assert probe.seen == [torch.float64, torch.float32, torch.int64, torch.float64]
    assert out.dtype == torch.float32


# -- torch on CUDA ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_source(tiny_model: Path) -> Any:
    from engine.models.folder import inspect_model_folder
    from engine.models.torch_modules import load_source_model

    return load_source_model(inspect_model_folder(tiny_model))


def _unet_feeds(
    rng: np.random.Generator, batch: int, height: int, width: int, hidden: int
) -> dict[str, np.ndarray]:
    return {
        "sample": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
        "timestep": rng.uniform(0, 999, batch).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, hidden), dtype=np.float32),
    }


def _cpu_unet(source: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        module = source.wrapper(Network.UNET).to("cpu")
        return module(
            *(torch.from_numpy(feeds[n]) for n in ("sample", "timestep", "encoder_hidden_states"))
        ).numpy()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 5e-3), ("fp16", 2e-2)])
def test_torch_cuda_graph_replays_match_the_cpu(tiny_source: Any, precision: str, tolerance: float) -> None:
    from engine.backends.torch_cuda import TorchCudaGraph, TorchCudaOptions, network_module
    from engine.specs import Precision

    hidden = tiny_source.unet.config.cross_attention_dim
    spec = unet_spec(ModelDims(text_hidden_size=hidden))
    options = TorchCudaOptions(precision=Precision(precision), warmup=1)
    source = copy.deepcopy(tiny_source)  # moving to the GPU and to fp16 happens in place
    module = network_module(source, spec, options.device, options.precision)
    graph = TorchCudaGraph(spec, module, options, options.precision, capture=True)
    rng = np.random.default_rng(6)
    for batch, height, width in [(2, 8, 8)] * 4 + [(2, 9, 7)] * 3:
        feeds = _unet_feeds(rng, batch, height, width, hidden)
        out = graph.run(feeds)["noise_pred"]
        assert rel_l2(_cpu_unet(tiny_source, feeds), out) < tolerance
    stats = graph.runner.stats
    assert (stats.captures, stats.replays, stats.dropped_graphs, stats.allocations) == (2, 5, 1, 2)


@pytest.mark.gpu
@needs_cuda
def test_fused_guidance_on_the_gpu_matches_run_and_guide(tiny_torch_engine: Path) -> None:
    from engine.pipeline.guidance import guide
    from engine.pipeline.request import GenerationRequest

    manifest = read_manifest(tiny_torch_engine)
    load = open_backend("torch-cuda", tiny_torch_engine, manifest, {"warmup": 1})
    unet, fused_unet = load(Network.UNET), load(Network.UNET_CFG)
    assert fused_unet.ops.module.unet is unet.ops.module  # one set of fp16 weights
    rng = np.random.default_rng(7)
    hidden = manifest.dims.text_hidden_size
    for _ in range(3):
        feeds = _unet_feeds(rng, 1, 8, 8, hidden)
        context = rng.standard_normal((2, 77, hidden), dtype=np.float32)
        both = unet.run({
            "sample": np.concatenate([feeds["sample"]] * 2),
            "timestep": np.concatenate([feeds["timestep"]] * 2),
            "encoder_hidden_states": context,
        })["noise_pred"]  # fmt: skip
        expected = guide(both, GenerationRequest.create("a", guidance_scale=7.5))
        fused = fused_unet.run({
            "sample": feeds["sample"],
            "timestep": feeds["timestep"],
            "encoder_hidden_states": context,
            "guidance_scale": np.array([7.5], np.float32),
        })["guided_noise"]  # fmt: skip
        assert rel_l2(expected, fused) < 1e-3
    assert fused_unet.runner.stats.replays == 2
    with pytest.raises(ValueError, match="2 x 1 embeddings"):
        fused_unet.run({
            "sample": feeds["sample"],
            "timestep": feeds["timestep"],
            "encoder_hidden_states": context[:1],
            "guidance_scale": np.array([7.5], np.float32),
        })  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_copies_bound_constants_once(tiny_torch_engine: Path) -> None:
    manifest = read_manifest(tiny_torch_engine)
    unet = open_backend("torch-cuda", tiny_torch_engine, manifest, {"warmup": 1})(Network.UNET_CFG)
    rng = np.random.default_rng(17)
    hidden = manifest.dims.text_hidden_size
    constants = {
        "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32),
        "guidance_scale": np.array([7.5], np.float32),
    }
    names = ("sample", "timestep")  # _unet_feeds' own (batch-1) embeddings must not replace the constants
    draws = [_unet_feeds(rng, 1, 8, 8, hidden) for _ in range(4)]
    steps = [{name: feeds[name] for name in names} for feeds in draws]
    expected = [unet.run({**constants, **varying})["guided_noise"] for varying in steps]
    with bound(unet, constants) as run:
        for step, varying in enumerate(steps):
            before = unet.runner.stats.bytes_in
            np.testing.assert_allclose(run(varying)["guided_noise"], expected[step], rtol=1e-3, atol=1e-3)
            copied = unet.runner.stats.bytes_in - before
            once = sum(v.nbytes for v in constants.values()) if step == 0 else 0
            assert copied == once + sum(v.nbytes for v in varying.values())
    assert unet.runner.constants == {} and unet.providers[0].endswith(":cuda-graph")


def _reference_image(engine_dir: Path, backend: str, **settings: Any) -> Any:
    """The first image of an fp32 CPU pipeline (``torch``: the source modules; ``onnxruntime``: the
    exported graphs) on the same settings."""
    from engine.pipeline import Pipeline

    return Pipeline.load(engine_dir, backend).generate("a lighthouse", **settings).images[0]


SETTINGS = {"steps": 12, "width": 64, "height": 64, "seed": 3, "sampler": "Euler a", "guidance_scale": 7.5}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("options", "min_psnr"), [({"precision": "fp32"}, 30.0), ({}, 22.0), ({"vae_precision": "fp16"}, 22.0)]
)
def test_torch_cuda_pipeline_matches_the_cpu_reference(
    tiny_torch_engine: Path, options: dict, min_psnr: float
) -> None:
    from engine.pipeline import Pipeline

    engine = tiny_torch_engine
    manifest = read_manifest(engine)
    pipe = Pipeline(engine, manifest, open_backend("torch-cuda", engine, manifest, options))
    reference = _reference_image(engine, "torch", **SETTINGS)
    for _ in range(2):  # the second run replays the captured UNet graph from its first step
        image = pipe.generate("a lighthouse", **SETTINGS).images[0]
        assert psnr(reference, image, peak=255) >= min_psnr
    assert pipe.graph(Network.UNET_CFG).runner.stats.replays >= SETTINGS["steps"]  # fused guidance


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_applies_a_lora_in_place_and_restores_it(tiny_torch_engine: Path, tmp_path: Path) -> None:
    """A LoRA tag on torch-cuda (fp32): the image follows the torch CPU reference with the same LoRA, and
    back without it the base image returns exactly (exported weights kept, CUDA graphs recaptured)."""
    from engine.adapters import Component
    from engine.pipeline import Pipeline
    from tests.adapters.lora_files import write_kohya_lora

    cpu = Pipeline.load(tiny_torch_engine, backend="torch", lora_dir=tmp_path)
    targets = cpu.loras._loader().lora_targets(Network.UNET)
    attention = {(Component.UNET, t.split(":", 1)[1]): shape for t, shape in targets.items() if ".attn" in t}
    write_kohya_lora(tmp_path / "style.safetensors", attention, rank=4, seed=5)
    gpu = Pipeline.load(tiny_torch_engine, backend="torch-cuda", lora_dir=tmp_path, precision="fp32")
    base = np.asarray(gpu.generate("a lighthouse", **SETTINGS).images[0])
    for _ in range(2):
        ours = gpu.generate("a lighthouse <lora:style:0.8>", **SETTINGS).images[0]
        want = cpu.generate("a lighthouse <lora:style:0.8>", **SETTINGS).images[0]
        assert psnr(want, ours, peak=255) >= 30
    np.testing.assert_array_equal(np.asarray(gpu.generate("a lighthouse", **SETTINGS).images[0]), base)


# -- TensorRT -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_env() -> tuple[Any, Any, Any]:
    pytest.importorskip("tensorrt", reason='tensorrt is not installed: pip install "sd-engine[tensorrt]"')
    from engine.tensorrt.env import check_environment

    try:
        return check_environment()
    except MissingDependencyError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def trt_engine(trt_env: Any, tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.build_trt import build_engine

    engine_dir = Path(shutil.copytree(tiny_engine, tmp_path_factory.mktemp("trt") / "engine"))
    build_engine(engine_dir, _trt_settings(networks=tuple(Network)))  # both UNets: fused and plain
    return engine_dir


def _trt_settings(**changes: Any) -> Any:
    """A 64x64 batch-1 static profile, 1 GiB workspace, a fixed parity seed."""
    from engine.build_trt import BuildSettings, ShapeProfile

    return BuildSettings(
        profiles=(ShapeProfile.static(1, 64, 64),), workspace_bytes=1 << 30, parity_seed=0, **changes
    )


@pytest.mark.tensorrt
@needs_tensorrt
def test_build_writes_index_sidecars_and_manifest_parity(trt_engine: Path) -> None:
    from engine.tensorrt.plans import INDEX_NAME, PLAN_DIR, read_sidecar

    index = json.loads((trt_engine / PLAN_DIR / INDEX_NAME).read_text())["networks"]
    assert index["unet"] == {"plan": "unet-fp16.plan", "fallback": None}
    assert index["unet_cfg"] == {"plan": "unet_cfg-fp16.plan", "fallback": None}
    assert index["vae_decoder"]["plan"] == "vae_decoder-fp32.plan"
    manifest = read_manifest(trt_engine)
    for network, entry in manifest.graphs.items():
        plan = index[network.value]["plan"]
        recorded = entry.parity["tensorrt"][plan]
        assert recorded["passed"] and recorded["worst_rel_l2"] <= recorded["threshold_rel_l2"]
        assert read_sidecar(trt_engine / PLAN_DIR / plan)["parity"] == recorded


@pytest.mark.tensorrt
@needs_tensorrt
def test_second_build_reuses_and_changed_settings_rebuild(trt_engine: Path) -> None:
    from engine.build_trt import build_engine

    again = build_engine(trt_engine, _trt_settings(networks=(Network.TEXT_ENCODER, Network.UNET)))
    assert [(r.target.name, r.built) for r in again] == [("text_encoder-fp16", False), ("unet-fp16", False)]
    rebuilt = build_engine(trt_engine, _trt_settings(networks=(Network.TEXT_ENCODER,), refit=True))
    assert rebuilt[0].built and rebuilt[0].reason == "the refittable flag changed"


@pytest.mark.tensorrt
@needs_tensorrt
def test_plan_from_another_gpu_is_refused_or_rebuilt(trt_engine: Path, tmp_path: Path) -> None:
    from engine.build_trt import Rebuild, build_engine
    from engine.errors import BuildError
    from engine.tensorrt.plans import PLAN_DIR

    engine_dir = Path(shutil.copytree(trt_engine, tmp_path / "engine"))
    sidecar = engine_dir / PLAN_DIR / "text_encoder-fp16.plan.json"
    data = json.loads(sidecar.read_text())
    data["key"]["gpu"] = "NVIDIA Imaginary 9000"
    sidecar.write_text(json.dumps(data))
    load = open_backend("tensorrt", engine_dir, read_manifest(engine_dir))
    with pytest.raises(EngineFolderError, match=r"NVIDIA Imaginary 9000.*sd-engine build"):
        load(Network.TEXT_ENCODER)
    with pytest.raises(BuildError, match=r"NVIDIA Imaginary 9000.*--no-rebuild"):
        build_engine(engine_dir, _trt_settings(networks=(Network.TEXT_ENCODER,), rebuild=Rebuild.NEVER))
    (result,) = build_engine(engine_dir, _trt_settings(networks=(Network.TEXT_ENCODER,)))
    assert result.built and "NVIDIA Imaginary 9000" in result.reason
    index = json.loads((engine_dir / PLAN_DIR / "plans.json").read_text())["networks"]
    # a partial build keeps the other networks' plans
    assert set(index) == {n.value for n in ModelDims().networks}
    load(Network.TEXT_ENCODER)


@pytest.mark.tensorrt
@needs_tensorrt
def test_trt_cuda_graph_replays_match_plain_runs(trt_engine: Path) -> None:
    manifest = read_manifest(trt_engine)
    graphed = open_backend("tensorrt", trt_engine, manifest, {"cuda_graph": True})(Network.UNET)
    plain = open_backend("tensorrt", trt_engine, manifest, {"cuda_graph": False})(Network.UNET)
    rng = np.random.default_rng(8)
    for _ in range(4):
        feeds = _unet_feeds(rng, 2, 8, 8, manifest.dims.text_hidden_size)
        np.testing.assert_allclose(
            graphed.run(feeds)["noise_pred"], plain.run(feeds)["noise_pred"], atol=1e-5
        )
    runner = graphed._runners[0]
    assert (runner.stats.captures, runner.stats.replays) == (1, 3)
    with pytest.raises(ValueError, match="no TensorRT profile"):
        graphed.run(_unet_feeds(rng, 4, 8, 8, manifest.dims.text_hidden_size))


@pytest.mark.tensorrt
@needs_tensorrt
def test_trt_pipeline_matches_onnxruntime(trt_engine: Path) -> None:
    from engine.pipeline import Pipeline

    manifest = read_manifest(trt_engine)
    reference = _reference_image(trt_engine, "onnxruntime", **SETTINGS)
    for fused in (True, False):
        pipe = Pipeline(trt_engine, manifest, open_backend("tensorrt", trt_engine, manifest), fused_cfg=fused)
        image = pipe.generate("a lighthouse", **SETTINGS).images[0]
        assert psnr(reference, image, peak=255) >= 22.0
        assert (Network.UNET_CFG in pipe._graphs) is fused
