"""cuda-python 12.x and 13.x behind engine.tensorrt.env, where each runs.

- No dependency: the pyproject extras pair each TensorRT build with the cuda-python of its CUDA major.
- The installed cuda-bindings, whichever major (skipped without it): the runtime module, handle addresses
  through ``native_handle``, and, on a machine without a driver, real calls: ``detect_gpu``'s one-line
  error and every runtime call TrtOps makes, with the argument types it passes (a wrong type raises
  TypeError before the call reaches the missing driver).
- ``slow``: the same tests in a subprocess against cuda-bindings 12.x and 13.x installed into a temporary
  folder from the package index.
- ``gpu``: TrtOps and CudaGraphRunner on a real GPU through cuda-python, TensorRT replaced by a stand-in
  execution context whose ``execute_async_v3`` enqueues a device-to-device copy on the given stream.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backends.cuda_graph import CudaGraphRunner
from engine.backends.tensorrt import TrtBuffers, TrtOps
from engine.errors import EngineError, MissingDependencyError
from engine.specs import GraphSpec, Network, TensorSpec
from engine.tensorrt import env as trt_env

REPO = Path(__file__).resolve().parents[2]
# The major the subprocess run of this file expects (set by test_each_major_version_in_a_subprocess).
EXPECTED_MAJOR_VARIABLE = "SD_ENGINE_EXPECT_CUDA_PYTHON_MAJOR"
PIP_INSTALL = (sys.executable, "-m", "pip", "install", "-q", "--no-input", "--disable-pip-version-check")
# The tests of this file that need cuda-bindings and no GPU (by name).
BINDINGS_TESTS = "runtime_module or native_handle_is or without_a_driver or reach_the_driver or runtime_call"
PYTEST = (sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider")


def _runtime() -> tuple[Any, str | None]:
    """The installed runtime module, or None and why not."""
    try:
        return trt_env.import_cudart(), None
    except MissingDependencyError as error:
        return None, str(error)


def _driver_version(cudart: Any) -> int:
    error, version = cudart.cudaDriverGetVersion()
    return int(version) if int(error) == 0 and version is not None else 0


def _gpu_skip_reason() -> str | None:
    cudart, reason = _runtime()
    if cudart is None:
        return reason
    try:
        trt_env.detect_gpu(cudart)
    except EngineError as error:
        return str(error)
    return None


CUDART, NO_CUDART = _runtime()
needs_cuda_python = pytest.mark.skipif(CUDART is None, reason=str(NO_CUDART))
# Calls with made-up handles are safe only where no driver can act on them.
needs_no_driver = pytest.mark.skipif(
    CUDART is not None and _driver_version(CUDART) > 0, reason="an NVIDIA driver is loaded here"
)
GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=f"no GPU for cuda-python: {GPU_SKIP}")


COPY_SPEC = GraphSpec(
    Network.UNET,
    inputs=(TensorSpec("x", ("rows", 3), "float32"), TensorSpec("b", (2,), "float16")),
    outputs=(TensorSpec("y", ("rows", 3), "float32"), TensorSpec("c", (2,), "float16")),
)
COPY_DTYPES = {t.name: np.dtype(t.dtype) for t in COPY_SPEC.inputs + COPY_SPEC.outputs}
PINNED = {f"host {name}": "cudaMemoryTypeHost" for name in COPY_DTYPES}


class CopyContext:
    """Stands in for a TensorRT 10 execution context (the calls TrtOps makes): each output is a
    device-to-device copy of one input, enqueued by ``execute_async_v3`` on the stream it is given,
    from the addresses bound at that moment, as TensorRT enqueues its kernels.

    sync: also synchronise the stream inside ``execute_async_v3``, which a stream capture forbids
    (cudaErrorStreamCaptureUnsupported): a plan that cannot be captured.
    """

    def __init__(
        self, cudart: Any, sources: Mapping[str, str], dtypes: Mapping[str, np.dtype], sync: bool = False
    ) -> None:
        self.cudart = cudart
        self.sources = dict(sources)  # output name -> input name
        self.dtypes = dict(dtypes)
        self.sync = sync
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.stream_handles: list[Any] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.sources[name]]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.stream_handles.append(stream_handle)
        stream = self.cudart.cudaStream_t(stream_handle)
        to_device = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for output, source in self.sources.items():
            nbytes = int(np.prod(self.shapes[source])) * self.dtypes[source].itemsize
            copy = (self.addresses[output], self.addresses[source], nbytes, to_device, stream)
            if int(self.cudart.cudaMemcpyAsync(*copy)[0]) != 0:
                return False
        return not self.sync or int(self.cudart.cudaStreamSynchronize(stream)[0]) == 0


# -- no dependency --------------------------------------------------------------------------------


def test_each_tensorrt_extra_pairs_tensorrt_and_cuda_python_of_one_cuda_major() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major, extra in trt_env.TRT_EXTRAS.items():
        name = re.fullmatch(r"sd-engine\[(.+)\]", extra).group(1)
        requirements = extras[name]
        assert any(r.startswith(f"tensorrt-cu{major}>=10") and r.endswith(",<11") for r in requirements)
        bindings = next(r for r in requirements if r.startswith("cuda-bindings"))
        assert re.fullmatch(rf"cuda-bindings>={major}(\.\d+)?,<{major + 1}", bindings), bindings
        assert any(r.startswith("polygraphy") for r in requirements)


class Status(int):
    """A cudaError_t as cuda-python returns it: an int with a name."""

    @property
    def name(self) -> str:
        return {0: "cudaSuccess", 35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice"}[int(self)]


class DriverAnswers:
    """The runtime calls detect_gpu makes when it finds no GPU, answered as cuda-python does under a
    given driver (the branches a machine without a driver cannot reach). Versions as 1000*major+10*minor."""

    def __init__(self, status: int, driver: int, runtime: int) -> None:
        self.status, self.driver, self.runtime = Status(status), driver, runtime

    def cudaGetDeviceCount(self) -> tuple[Status, int | None]:
        return (self.status, None if self.status else 0)

    def cudaDriverGetVersion(self) -> tuple[Status, int]:
        return (Status(0), self.driver)

    def cudaRuntimeGetVersion(self) -> tuple[Status, int]:
        return (Status(0), self.runtime)


@pytest.mark.parametrize(
    ("status", "driver", "runtime", "expected"),
    [
        # cuda-python 13 on an R535 machine: the extra for CUDA 12 drivers fits
        (
            35,
            12020,
            13000,
            "the NVIDIA driver supports CUDA 12.2, older than the CUDA 13.0 runtime of the "
            "installed cuda-python (cudaGetDeviceCount: cudaErrorInsufficientDriver); "
            'pip install "sd-engine[tensorrt]" for this driver',
        ),
        # cuda-python 12 on a CUDA 11 driver: no extra fits
        (
            35,
            11080,
            12090,
            "the NVIDIA driver supports CUDA 11.8, older than the CUDA 12.9 runtime of the "
            "installed cuda-python (cudaGetDeviceCount: cudaErrorInsufficientDriver)",
        ),
        # a driver of the same major but no device (minor versions are compatible)
        (
            100,
            13000,
            13050,
            "no CUDA GPU found (cudaGetDeviceCount: cudaErrorNoDevice; driver CUDA 13.0); "
            "TensorRT needs an NVIDIA GPU and driver",
        ),
        (
            0,
            13000,
            13000,
            "no CUDA GPU found (cudaGetDeviceCount: 0 devices); TensorRT needs an NVIDIA GPU and driver",
        ),
    ],
)
def test_no_gpu_says_whether_the_driver_is_too_old_for_the_installed_cuda_python(
    status: int, driver: int, runtime: int, expected: str
) -> None:
    with pytest.raises(MissingDependencyError) as info:
        trt_env.detect_gpu(DriverAnswers(status, driver, runtime))
    assert str(info.value) == expected


def test_a_plain_int_is_its_own_handle() -> None:
    """cudaMalloc's device pointers are ints already; native_handle must not look them up."""
    assert trt_env.native_handle(0x7F0012340000) == 0x7F0012340000


# -- the installed cuda-bindings ------------------------------------------------------------------


@needs_cuda_python
def test_the_runtime_module_is_cuda_bindings_runtime_of_the_installed_major() -> None:
    import cuda.bindings

    assert CUDART.__name__ == "cuda.bindings.runtime"
    major = trt_env.cuda_python_major()
    assert trt_env.cuda_python_version() == cuda.bindings.__version__
    assert major == int(cuda.bindings.__version__.split(".")[0]) and major in trt_env.TRT_EXTRAS
    expected = os.environ.get(EXPECTED_MAJOR_VARIABLE)
    if expected is not None:
        assert major == int(expected), f"ran against cuda-bindings {cuda.bindings.__version__}"
    if major >= 13:  # 13.0 removed the trampoline modules: only cuda.bindings.* remains
        with pytest.raises(ImportError):
            import cuda.cudart


@needs_cuda_python
def test_native_handle_is_the_address_a_handle_wraps() -> None:
    from cuda.bindings import driver

    types = (CUDART.cudaStream_t, CUDART.cudaEvent_t, CUDART.cudaGraph_t, CUDART.cudaGraphExec_t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated conversion (int(handle) on 13.x) on the way
        for offset, handle_type in enumerate(types):
            address = 0x7F00_0000_1000 + 0x100 * offset
            handle = handle_type(address)
            assert trt_env.native_handle(handle) == address
            assert type(trt_env.native_handle(handle)) is int  # what TensorRT's execute_async_v3 takes
        assert trt_env.native_handle(driver.CUstream(0x2000)) == 0x2000
        assert trt_env.native_handle(CUDART.cudaStream_t(0)) == 0  # the legacy default stream


@needs_cuda_python
@needs_no_driver
def test_detect_gpu_without_a_driver_is_one_line() -> None:
    with pytest.raises(MissingDependencyError) as info:
        trt_env.detect_gpu(CUDART)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("no CUDA GPU found: no NVIDIA driver is loaded (cudaGetDeviceCount: cudaError")


@needs_cuda_python
@needs_no_driver
def test_trt_ops_reach_the_driver_through_the_real_bindings() -> None:
    context = CopyContext(CUDART, {"y": "x", "c": "b"}, COPY_DTYPES)
    ops = TrtOps(context, COPY_SPEC, COPY_DTYPES, CUDART, CUDART.cudaStream_t(0x1000))
    with pytest.raises(EngineError, match=r"^CUDA call cudaMalloc failed: cudaError\w+$"):
        ops.allocate({"x": (2, 3), "b": (2,)})
    with pytest.raises(EngineError, match=r"^CUDA call cudaEventCreate failed: cudaError\w+$"):
        TrtOps(context, COPY_SPEC, COPY_DTYPES, CUDART, CUDART.cudaStream_t(0x1000), timing=True)


def _trt_ops_calls(rt: Any) -> dict[str, tuple[Any, ...]]:
    """Every runtime call of engine.backends.tensorrt (TrtOps, TrtGraph) and env.detect_gpu, with
    arguments of the types they pass there (handles as cuda-python objects, pointers as ints)."""
    stream, event = rt.cudaStream_t(0x1000), rt.cudaEvent_t(0x2000)
    graph, graph_exec = rt.cudaGraph_t(0x3000), rt.cudaGraphExec_t(0x4000)
    kind, mode = rt.cudaMemcpyKind, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    return {
        "cudaGetDeviceCount": (),
        "cudaGetDeviceProperties": (0,),
        "cudaSetDevice": (0,),
        "cudaStreamCreateWithFlags": (rt.cudaStreamNonBlocking,),
        "cudaEventCreate": (),
        "cudaMalloc": (64,),
        "cudaMallocHost": (64,),
        "cudaMemcpyAsync": (0x10, 0x20, 64, kind.cudaMemcpyHostToDevice, stream),
        "cudaEventRecord": (event, stream),
        "cudaStreamBeginCapture": (stream, mode),
        "cudaStreamEndCapture": (stream,),
        "cudaGraphInstantiate": (graph, 0),
        "cudaGraphLaunch": (graph_exec, stream),
        "cudaStreamSynchronize": (stream,),
        "cudaEventElapsedTime": (event, rt.cudaEvent_t(0x2100)),
        "cudaGraphExecDestroy": (graph_exec,),
        "cudaGraphDestroy": (graph,),
        "cudaFree": (0x10,),
        "cudaFreeHost": (0x20,),
        "cudaEventDestroy": (event,),
        "cudaStreamDestroy": (stream,),
    }


@needs_cuda_python
@needs_no_driver
def test_every_runtime_call_accepts_the_arguments_the_backend_passes() -> None:
    for name, args in _trt_ops_calls(CUDART).items():
        result = getattr(CUDART, name)(*args)  # a TypeError here: the signature changed
        error = result[0] if isinstance(result, tuple) else result
        assert isinstance(error, CUDART.cudaError_t) and int(error) != 0, (name, result)
        with pytest.raises(EngineError, match=f"CUDA call {name} failed"):
            trt_env.cuda_check(result, name)


# -- both majors, from the package index ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("major", [12, 13])
def test_each_major_version_in_a_subprocess(major: int, tmp_path: Path) -> None:
    """This file's cuda-python tests against cuda-bindings ``major``.x, installed into tmp_path (with
    cuda-pathfinder) and put first on the path; needs the package index."""
    target = tmp_path / f"cuda-bindings-{major}"
    install = subprocess.run(
        [*PIP_INSTALL, "--target", str(target), f"cuda-bindings>={major},<{major + 1}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install cuda-bindings {major}.x: {install.stderr.strip()[-300:]}")
    environment = {**os.environ, EXPECTED_MAJOR_VARIABLE: str(major)}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    tests = subprocess.run(
        [*PYTEST, __file__, "-m", "not slow", "-k", BINDINGS_TESTS],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    passed = re.search(r"(\d+) passed", tests.stdout)
    # 5 without a driver; the module and handle tests (2) wherever a driver is loaded
    assert passed is not None and int(passed.group(1)) >= 2, tests.stdout[-2000:]


# -- on a GPU -------------------------------------------------------------------------------------


def _memory_type(cudart: Any, pointer: int) -> str:
    """What CUDA knows a pointer as: cudaMemoryTypeDevice / Host, or Unregistered once freed (an error
    from cudaPointerGetAttributes counts as unknown to CUDA too)."""
    error, attributes = cudart.cudaPointerGetAttributes(pointer)
    return attributes.type.name if int(error) == 0 else "cudaMemoryTypeUnregistered"


class TrackedOps(TrtOps):
    """TrtOps that checks, at each release, that CUDA no longer knows the released pointers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allocated: list[dict[str, str]] = []
        self.released: list[dict[str, str]] = []

    def allocate(
        self, shapes: Mapping[str, tuple[int, ...]], constants: frozenset[str] = frozenset()
    ) -> TrtBuffers:
        buffers = super().allocate(shapes, constants)
        self.allocated.append(self._types(buffers))
        return buffers

    def release(self, buffers: TrtBuffers) -> None:
        pointers = {**buffers.device, **{f"host {k}": v for k, v in buffers.host_ptrs.items()}}
        super().release(buffers)
        self.released.append({name: _memory_type(self.cudart, p) for name, p in pointers.items()})

    def _types(self, buffers: TrtBuffers) -> dict[str, str]:
        device = {name: _memory_type(self.cudart, p) for name, p in buffers.device.items()}
        host = {f"host {name}": _memory_type(self.cudart, p) for name, p in buffers.host_ptrs.items()}
        return {**device, **host}


def _gpu_stream(cudart: Any) -> Any:
    trt_env.cuda_check(cudart.cudaSetDevice(0), "cudaSetDevice")
    flags = cudart.cudaStreamNonBlocking  # as TrtGraph makes it: a capture needs a non-default stream
    return trt_env.cuda_check(cudart.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed capture must fail this test
def test_trt_ops_launch_capture_replay_and_free_on_the_gpu(rng: np.random.Generator) -> None:
    cudart = CUDART
    stream = _gpu_stream(cudart)
    context = CopyContext(cudart, {"y": "x", "c": "b"}, COPY_DTYPES)
    ops = TrackedOps(context, COPY_SPEC, COPY_DTYPES, cudart, stream, timing=True)
    runner = CudaGraphRunner(ops, warmup=1)
    try:
        constant = rng.standard_normal(2).astype(np.float16)
        runner.bind_constants({"b": constant})  # copied to the device once, outside the graph
        for rows in (4, 4, 4, 7, 7):  # launch, capture + replay, replay; new shape: launch, capture
            x = rng.standard_normal((rows, 3), dtype=np.float32)
            outputs = runner.run({"x": x})
            np.testing.assert_array_equal(outputs["y"], x)  # the replay copied the new input
            np.testing.assert_array_equal(outputs["c"], constant)
        stats = runner.stats
        assert (stats.launches, stats.captures, stats.replays) == (2, 2, 3)
        assert (stats.allocations, stats.dropped_graphs) == (2, 1)  # the shape change dropped the graph
        # execute_async_v3 ran at each launch and each capture (a replay does not call it), on our stream.
        assert context.stream_handles == [trt_env.native_handle(stream)] * 4
        assert all(type(handle) is int for handle in context.stream_handles)
        assert len(ops.device_ms) == 5 and all(np.isfinite(ms) and ms >= 0 for ms in ops.device_ms)
    finally:
        runner.reset()  # drops the graph, frees the buffers
        ops.destroy_events()
        trt_env.cuda_check(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
    device = "cudaMemoryTypeDevice"
    assert ops.allocated == [{"x": device, "b": device, "y": device, "c": device, **PINNED}] * 2
    assert ops.released == [dict.fromkeys([*COPY_DTYPES, *PINNED], "cudaMemoryTypeUnregistered")] * 2


@needs_gpu
@pytest.mark.gpu
def test_a_plan_that_cannot_be_captured_runs_without_a_graph_on_the_gpu(rng: np.random.Generator) -> None:
    cudart = CUDART
    stream = _gpu_stream(cudart)
    context = CopyContext(cudart, {"y": "x", "c": "b"}, COPY_DTYPES, sync=True)
    ops = TrtOps(context, COPY_SPEC, COPY_DTYPES, cudart, stream)
    runner = CudaGraphRunner(ops, warmup=1)
    try:
        feeds = [
            {"x": rng.standard_normal((3, 3), dtype=np.float32), "b": np.ones(2, np.float16) * i}
            for i in range(3)
        ]
        np.testing.assert_array_equal(runner.run(feeds[0])["y"], feeds[0]["x"])
        with pytest.warns(RuntimeWarning, match=r"CUDA graph capture failed \(.*execute_async_v3 failed"):
            outputs = runner.run(feeds[1])  # the capture ended (invalidated), then a plain launch
        np.testing.assert_array_equal(outputs["y"], feeds[1]["x"])
        np.testing.assert_array_equal(outputs["c"], feeds[1]["b"])
        outputs = runner.run(feeds[2])  # the stream is usable after the failed capture
        np.testing.assert_array_equal(outputs["y"], feeds[2]["x"])
        assert runner.capture_failed and (runner.stats.launches, runner.stats.captures) == (3, 0)
    finally:
        runner.reset()
        trt_env.cuda_check(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")
