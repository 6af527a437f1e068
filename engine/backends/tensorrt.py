"""The tensorrt runtime backend: built plans behind the runtime's Graph interface, with CUDA graphs.

``open_engine(engine_dir, manifest, options)`` checks the environment (tensorrt, cuda-python, a GPU), reads
``tensorrt/plans.json`` written by ``sd-engine build`` and returns a loader the pipeline calls per
network. A plan is loaded only if its sidecar says it was built from the manifest's ONNX graph, with
this TensorRT version, on this GPU model, and passed its parity gate; otherwise a one-line
EngineFolderError says why and how to rebuild.

Per plan: one execution context per optimization profile, made on first use (a request takes the first
profile whose ranges cover its shapes), one CUDA stream, and per context a
:class:`~engine.backends.cuda_graph.CudaGraphRunner` over static device buffers and pinned host
buffers. A step is: NumPy feeds copied into the pinned input buffers, one CUDA-graph launch holding
the host-to-device copies, ``execute_async_v3`` and the device-to-host copies, one stream
synchronisation. Constants bound for a generation (prompt embeddings, guidance scale) are copied to
their device buffers once, outside the graph, which copies only the varying inputs. ``run`` returns
copies the caller owns; the pinned buffers stay the graph's.

tensorrt and cuda-python are imported only inside :func:`open_engine` (through
:func:`engine.tensorrt.env.check_environment`); nothing of the builder (or polygraphy) is imported.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.cuda_graph import CudaGraphRunner, GuardedGraph, graph_providers
from engine.backends.options import CUDA, Device, Switch, parse_backend_options
from engine.backends.weights import Merge, stored_initializers
from engine.errors import BuildError, EngineError, EngineFolderError
from engine.manifest import Manifest, require_onnx
from engine.runtime import Graph
from engine.specs import GraphSpec, Network, check_inputs
from engine.tensorrt.env import (
    check_environment,
    cuda_check,
    error_count,
    errors_since,
    native_handle,
    trt_logger,
)
from engine.tensorrt.plans import PLAN_DIR, GpuInfo, key_mismatch, read_plan_index, read_sidecar

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
# Per input with a dynamic axis: (min shape, max shape) of one optimization profile.
ProfileRanges = Mapping[str, tuple[Shape, Shape]]


@dataclass(frozen=True)
class TrtOptions:
    """device: ``cuda`` or ``cuda:N``.
    cuda_graph: capture the plan's run (copies included) per shape and replay it; auto: on.
    timing: record each run's device time (copies included) with CUDA events, in ``device_ms``."""

    device: Device = CUDA
    cuda_graph: Switch = Switch.AUTO
    warmup: int = 1
    timing: bool = False


def plan_load_problem(
    sidecar: Mapping[str, Any], onnx_sha256: str, tensorrt_version: str, gpu: GpuInfo
) -> str | None:
    """Why a built plan may not run here: another TensorRT / GPU / ONNX graph, or a failed gate."""
    stored = sidecar["key"]
    fields = ("tensorrt", "gpu", "compute_capability", "onnx_sha256")
    here = {"tensorrt": tensorrt_version, "gpu": gpu.name, "compute_capability": gpu.compute_capability}
    mismatch = key_mismatch({k: stored.get(k) for k in fields}, {**here, "onnx_sha256": onnx_sha256})
    if mismatch is not None:
        return mismatch
    if not sidecar["parity"].get("passed", False):
        return "it failed its parity gate"
    return None


def read_plan(plan: Path, onnx_sha256: str, tensorrt_version: str, gpu: GpuInfo) -> bytes:
    """A plan's bytes, after its sidecar proved it belongs to this graph, TensorRT and GPU."""
    rebuild = f"rebuild with `sd-engine build {plan.parent.parent}`"
    if not plan.is_file():
        raise EngineFolderError(f"TensorRT plan {plan} is missing; {rebuild}")
    try:
        sidecar = read_sidecar(plan)
    except BuildError as error:
        raise EngineFolderError(f"TensorRT plan {plan} cannot be used: {error}; {rebuild}") from None
    problem = plan_load_problem(sidecar, onnx_sha256, tensorrt_version, gpu)
    data = plan.read_bytes() if problem is None else b""
    if problem is None and len(data) != sidecar["plan_bytes"]:
        problem = "the plan file is truncated"
    if problem is not None:
        raise EngineFolderError(f"TensorRT plan {plan.name} cannot be used: {problem}; {rebuild}")
    return data


def choose_profile(ranges: Sequence[ProfileRanges], shapes: Mapping[str, Shape]) -> int | None:
    """Index of the first profile whose min/max cover every input shape; None when none does."""
    for index, profile in enumerate(ranges):
        if all(
            len(shapes[name]) == len(low)
            and all(lo <= s <= hi for s, lo, hi in zip(shapes[name], low, high, strict=True))
            for name, (low, high) in profile.items()
        ):
            return index
    return None


def describe_ranges(ranges: Sequence[ProfileRanges]) -> str:
    return "; ".join(
        ", ".join(f"{name} {list(low)}..{list(high)}" for name, (low, high) in profile.items())
        for profile in ranges
    )


@dataclass
class TrtBuffers:
    """Static buffers of one shape: device pointers and pinned host arrays, per tensor name."""

    device: dict[str, int]
    host: dict[str, np.ndarray]
    host_ptrs: dict[str, int]
    nbytes: dict[str, int]
    copied_in: tuple[str, ...] = ()  # inputs each launch / graph copies to the device (not the constants)


class TrtOps:
    """GraphOps for one execution context: copies, execute_async_v3, and stream capture."""

    def __init__(
        self,
        context: Any,
        spec: GraphSpec,
        dtypes: Mapping[str, np.dtype],
        cudart: Any,
        stream: Any,
        timing: bool = False,
        logger: Any = None,
    ):
        self.context = context
        self.logger = logger  # the TensorRT logger (env.trt_logger): its errors go into failure messages
        self.spec = spec
        self.dtypes = dtypes
        self.cudart = cudart
        self.stream = stream
        self.device_ms: list[float] = []
        self._events = (
            tuple(cuda_check(cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(2))
            if timing
            else None
        )

    def allocate(self, shapes: Mapping[str, Shape], constants: frozenset[str] = frozenset()) -> TrtBuffers:
        for name, shape in shapes.items():
            before = error_count(self.logger)
            failure: Exception | None = None
            try:  # the Python bindings may raise where C++ returns false
                accepted = self.context.set_input_shape(name, shape)
            except RuntimeError as error:
                accepted, failure = False, error
            if not accepted:
                raise ValueError(
                    f"{self.spec.network.value}: TensorRT rejected input '{name}' shape {list(shape)}"
                    f"{errors_since(self.logger, before, failure)}"
                )
        all_shapes = dict(shapes)
        for name in self.spec.output_names:
            all_shapes[name] = tuple(int(d) for d in self.context.get_tensor_shape(name))
        copied_in = tuple(name for name in self.spec.input_names if name not in constants)
        buffers = TrtBuffers({}, {}, {}, {}, copied_in)
        try:
            for name, shape in all_shapes.items():
                self._allocate_tensor(buffers, name, shape)
        except BaseException:
            self.release(buffers)
            raise
        return buffers

    def _allocate_tensor(self, buffers: TrtBuffers, name: str, shape: Shape) -> None:
        dtype = self.dtypes[name]
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        buffers.device[name] = int(cuda_check(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        buffers.nbytes[name] = nbytes
        pointer = int(cuda_check(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        buffers.host_ptrs[name] = pointer
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointer))
        buffers.host[name] = raw[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
        if not self.context.set_tensor_address(name, buffers.device[name]):
            raise EngineError(f"{self.spec.network.value}: TensorRT rejected the address of '{name}'")

    def release(self, buffers: TrtBuffers) -> None:
        for pointer in buffers.device.values():
            cuda_check(self.cudart.cudaFree(pointer), "cudaFree")
        for pointer in buffers.host_ptrs.values():
            cuda_check(self.cudart.cudaFreeHost(pointer), "cudaFreeHost")
        buffers.device.clear()
        buffers.host_ptrs.clear()
        buffers.host.clear()

    def write_inputs(self, buffers: TrtBuffers, feeds: Mapping[str, np.ndarray]) -> None:
        """Into the pinned host buffers; the launch (or the graph) copies them to the device."""
        for name, value in feeds.items():
            np.copyto(buffers.host[name], value, casting="no")

    def write_constants(self, buffers: TrtBuffers, constants: Mapping[str, np.ndarray]) -> None:
        """Into the pinned host buffers and on to the device now, on the stream (ordered before the next
        launch; the previous run's synchronisation means no copy of them is in flight)."""
        to_device = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, value in constants.items():
            np.copyto(buffers.host[name], value, casting="no")
            args = (
                buffers.device[name],
                buffers.host_ptrs[name],
                buffers.nbytes[name],
                to_device,
                self.stream,
            )
            cuda_check(self.cudart.cudaMemcpyAsync(*args), "cudaMemcpyAsync")

    def _enqueue(self, buffers: TrtBuffers) -> None:
        """Host-to-device copies, the plan, device-to-host copies: all on the stream, nothing waits."""
        cudart, stream = self.cudart, self.stream
        to_device, to_host = (
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        for name in buffers.copied_in:
            args = (buffers.device[name], buffers.host_ptrs[name], buffers.nbytes[name], to_device, stream)
            cuda_check(cudart.cudaMemcpyAsync(*args), "cudaMemcpyAsync")
        if not self.context.execute_async_v3(native_handle(stream)):
            raise EngineError(f"{self.spec.network.value}: TensorRT execute_async_v3 failed")
        for name in self.spec.output_names:
            args = (buffers.host_ptrs[name], buffers.device[name], buffers.nbytes[name], to_host, stream)
            cuda_check(cudart.cudaMemcpyAsync(*args), "cudaMemcpyAsync")

    def launch(self, buffers: TrtBuffers) -> None:
        self._record(0)
        self._enqueue(buffers)
        self._record(1)

    def destroy_events(self) -> None:
        for event in self._events or ():
            cuda_check(self.cudart.cudaEventDestroy(event), "cudaEventDestroy")
        self._events = None

    def _record(self, which: int) -> None:
        if self._events is not None:
            cuda_check(self.cudart.cudaEventRecord(self._events[which], self.stream), "cudaEventRecord")

    def capture(self, buffers: TrtBuffers) -> tuple[Any, Any]:
        cudart = self.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_check(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            self._enqueue(buffers)
        except BaseException:  # end the capture (the stream is unusable inside one), keep the first error
            error, partial = cudart.cudaStreamEndCapture(self.stream)
            if int(error) == 0 and partial is not None and native_handle(partial) != 0:
                cudart.cudaGraphDestroy(partial)
            raise
        graph = cuda_check(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            return graph, cuda_check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except EngineError:
            cudart.cudaGraphDestroy(graph)
            raise

    def replay(self, graph: tuple[Any, Any]) -> None:
        self._record(0)
        cuda_check(self.cudart.cudaGraphLaunch(graph[1], self.stream), "cudaGraphLaunch")
        self._record(1)

    def release_graph(self, graph: tuple[Any, Any]) -> None:
        cuda_check(self.cudart.cudaGraphExecDestroy(graph[1]), "cudaGraphExecDestroy")
        cuda_check(self.cudart.cudaGraphDestroy(graph[0]), "cudaGraphDestroy")

    def read_outputs(self, buffers: TrtBuffers) -> dict[str, np.ndarray]:
        cuda_check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if self._events is not None:
            elapsed = cuda_check(self.cudart.cudaEventElapsedTime(*self._events), "cudaEventElapsedTime")
            self.device_ms.append(float(elapsed))
        return {name: buffers.host[name] for name in self.spec.output_names}


def engine_io(trt: Any, engine: Any, spec: GraphSpec, plan: Path) -> dict[str, np.dtype]:
    """The plan's tensor dtypes, checked against the spec (a plan of another export is refused)."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        io[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
    wanted = {t.name: np.dtype(t.dtype) for t in spec.inputs + spec.outputs}
    if io != wanted:
        found = {k: v.name for k, v in io.items()}
        wanted_names = {k: v.name for k, v in wanted.items()}
        raise EngineFolderError(
            f"{plan} does not match the {spec.network.value} spec: plan tensors {found}, "
            f"spec {wanted_names}; rebuild with `sd-engine build`"
        )
    return io


def profile_ranges(engine: Any, spec: GraphSpec) -> list[ProfileRanges]:
    """(min, max) per dynamic input and profile, as the plan holds them."""
    ranges = []
    for index in range(engine.num_optimization_profiles):
        profile = {}
        for tensor in spec.inputs:
            if tensor.symbols():
                low, _, high = engine.get_tensor_profile_shape(tensor.name, index)
                profile[tensor.name] = (tuple(int(d) for d in low), tuple(int(d) for d in high))
        ranges.append(profile)
    return ranges


class TrtGraph:
    """One deserialized plan: a context, static buffers and a CUDA-graph runner per profile."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, spec: GraphSpec, plan: Path, options: TrtOptions):
        self.spec = spec
        self.plan = plan
        self.cuda_graph = Switch.of(options.cuda_graph).resolve(True)
        self.constants: dict[str, np.ndarray] = {}
        self._trt, self._cudart, self._engine, self._options = trt, cudart, engine, options
        self._dtypes = engine_io(trt, engine, spec, plan)
        self._ranges = profile_ranges(engine, spec)
        # Non-blocking: no implicit sync with the legacy default stream, which would break a capture.
        flags = cudart.cudaStreamNonBlocking
        self._stream = cuda_check(cudart.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self._runners: dict[int, CudaGraphRunner] = {}
        self._contexts: dict[int, Any] = {}

    @property
    def providers(self) -> list[str]:
        """``tensorrt:cuda-graph`` while CUDA graphs are on and no capture failed, else ``tensorrt``."""
        return graph_providers("tensorrt", self._runners.values(), self.cuda_graph)

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        """Inputs copied to the device once per bind (per profile's buffers), not at every run."""
        self.constants = dict(constants)
        for runner in self._runners.values():
            runner.bind_constants(self.constants)

    def unbind_constants(self) -> None:
        self.constants = {}
        for runner in self._runners.values():
            runner.unbind_constants()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check feeds (with the bound constants) against the spec, run on the covering profile, return
        arrays the caller owns."""
        merged = {**self.constants, **feeds}
        check_inputs(self.spec, merged)
        shapes = {name: tuple(merged[name].shape) for name in self.spec.input_names}
        index = choose_profile(self._ranges, shapes)
        if index is None:
            shown = {k: list(v) for k, v in shapes.items()}
            raise ValueError(
                f"{self.spec.network.value}: no TensorRT profile of {self.plan.name} covers input shapes "
                f"{shown} (profiles: {describe_ranges(self._ranges)}); "
                "rebuild with `sd-engine build` and the --batch / --size you need"
            )
        runner = self._runner(index)
        varying = {name: merged[name] for name in self.spec.input_names if name not in self.constants}
        outputs = runner.run(varying)
        return {name: np.array(outputs[name], copy=True) for name in self.spec.output_names}

    def _runner(self, index: int) -> CudaGraphRunner:
        if index not in self._runners:
            # One context per profile; each allocates activation memory for its own profile only.
            strategy = self._trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
            context = self._engine.create_execution_context(strategy)
            if context is None:
                raise EngineError(
                    f"TensorRT could not create an execution context for {self.plan.name} (GPU memory?)"
                )
            logger = trt_logger(self._trt)
            before = error_count(logger)
            failure: Exception | None = None
            try:  # the Python bindings raise on failure where C++ returns false
                accepted = context.set_optimization_profile_async(index, native_handle(self._stream))
            except RuntimeError as error:
                accepted, failure = False, error
            if not accepted:
                raise EngineError(
                    f"TensorRT rejected optimization profile {index} of {self.plan.name}"
                    f"{errors_since(logger, before, failure)}"
                )
            opts = self._options
            ops = TrtOps(context, self.spec, self._dtypes, self._cudart, self._stream, opts.timing, logger)
            self._contexts[index] = context
            self._runners[index] = CudaGraphRunner(ops, opts.warmup, self.cuda_graph)
            self._runners[index].bind_constants(self.constants)  # a profile first used mid-generation
        return self._runners[index]

    @property
    def device_ms(self) -> list[float]:
        """Device time of every timed run (TrtOptions.timing), all profiles."""
        return [ms for runner in self._runners.values() for ms in runner.ops.device_ms]

    def refit(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace weights by ONNX initializer name (TensorRT's Refitter, plans built with REFIT) and drop
        the captured CUDA graphs and contexts' buffers, which recorded the old launches."""
        trt = self._trt
        if not getattr(self._engine, "refittable", False):
            raise EngineError(
                f"{self.plan.name} is not refittable, so LoRAs cannot be applied; rebuild the plans with "
                "`sd-engine build ENGINE_DIR --refit`"
            )
        refitter = trt.Refitter(self._engine, trt_logger(trt))
        kept = [np.ascontiguousarray(value) for value in values.values()]  # alive until the refit ends
        for name, value in zip(values, kept, strict=True):
            if not refitter.set_named_weights(name, trt.Weights(value)):
                raise EngineError(f"TensorRT has no refittable weight {name} in {self.plan.name}")
        if not refitter.refit_cuda_engine():
            raise EngineError(
                f"TensorRT could not refit {self.plan.name} (missing weights: "
                f"{list(refitter.get_missing_weights())[:5]})"
            )
        for runner in self._runners.values():
            runner.invalidate()  # the buffers stay; the next run captures a graph of the new weights

    def close(self) -> None:
        """Free graphs, buffers, contexts and the stream (the plan's engine goes with the object)."""
        for runner in self._runners.values():
            runner.reset()
            runner.ops.destroy_events()
        self._runners.clear()
        self._contexts.clear()
        if self._stream is not None:
            cuda_check(self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


def open_engine(engine_dir: Path, manifest: Manifest, options: Mapping[str, Any]) -> TrtEngine:
    """A loader of the engine folder's TensorRT plans (options: see :class:`TrtOptions`)."""
    require_onnx(engine_dir, manifest, "the tensorrt backend")
    opts = parse_backend_options(TrtOptions, options, "tensorrt")
    return TrtEngine(Path(engine_dir), manifest, opts)


class TrtEngine:
    """Loads an engine folder's plans; patchable in place (see :class:`engine.backends.weights.Patchable`):
    LoRA weights are refitted by ONNX initializer name into plans built with ``sd-engine build --refit``,
    and the refitted graph's captured CUDA graphs are dropped (they are captured again on the next run)."""

    in_place = True

    def __init__(self, engine_dir: Path, manifest: Manifest, options: TrtOptions) -> None:
        self.trt, self.cudart, self.gpu = check_environment(options.device.index)
        self.root, self.manifest, self.options = engine_dir, manifest, options
        self.index = read_plan_index(engine_dir)
        self.runtime = self.trt.Runtime(trt_logger(self.trt))
        self._loaded: dict[Network, list[TrtGraph]] = {}
        self._patched: dict[Network, set[str]] = {}

    def _load_plan(self, network: Network, file: str) -> TrtGraph:
        entry = self.manifest.graphs[network]
        path = self.root / PLAN_DIR / file
        engine = self.runtime.deserialize_cuda_engine(
            read_plan(path, entry.sha256, self.trt.__version__, self.gpu)
        )
        if engine is None:
            raise EngineFolderError(
                f"TensorRT cannot deserialize {path}; rebuild with `sd-engine build {self.root}`"
            )
        graph = TrtGraph(self.trt, self.cudart, engine, entry.spec, path, self.options)
        self._loaded.setdefault(network, []).append(graph)
        return graph

    def __call__(self, network: Network) -> Graph:
        plans = self.index.get(network.value)
        if not plans or not plans.get("plan"):
            raise EngineFolderError(
                f"no TensorRT plan for {network.value} in {self.root / PLAN_DIR}; build it with "
                f"`sd-engine build {self.root} --networks {network.value}`"
            )
        primary = self._load_plan(network, str(plans["plan"]))
        if plans.get("fallback"):
            return GuardedGraph(primary, self._load_plan(network, str(plans["fallback"])))
        return primary

    def lora_targets(self, network: Network) -> dict[str, tuple[int, ...]]:
        return {target: ref.shape for target, ref in self.manifest.graphs[network].weights.items()}

    def load_patched(
        self, network: Network, targets: Collection[str], merge: Merge, identity: str | None = None
    ) -> Graph:
        """Refit every loaded plan of the network: the merged targets in, the exported values back for
        targets patched before and left out now. EngineError when a plan is not refittable."""
        refs = self.manifest.graphs[network].weights
        restore = self._patched.get(network, set()) - set(targets)
        values = stored_initializers(self.root, refs, targets, merge)
        values.update(stored_initializers(self.root, refs, restore, lambda _, base: np.asarray(base)))
        for graph in self._loaded.get(network, []):
            graph.refit(values)
        self._patched[network] = set(targets)
        return self._loaded[network][-1] if network in self._loaded else self(network)
