"""The runtime's face: the Graph protocol every loaded network implements, the one registry of backends,
and binding a generation's constant inputs.

Backends are declared once, in :class:`BackendName` and :data:`BACKENDS`; the CLI, the pipeline and the
bench read them from here. :func:`open_backend` imports the chosen backend's module and calls its
``open_engine(engine_dir, manifest, options)``, the one opener signature every backend module has.

Imports only numpy, the standard library and light engine modules; a backend module is imported when
it is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from engine.backends.options import CPU, CUDA, Device, DeviceKind, Switch
from engine.errors import EngineError
from engine.specs import GraphSpec, Network

if TYPE_CHECKING:
    from engine.manifest import Manifest

__all__ = [
    "BACKENDS",
    "CPU",
    "CUDA",
    "OVERFLOW_HINT",
    "Backend",
    "BackendInfo",
    "BackendName",
    "BindsConstants",
    "Device",
    "DeviceKind",
    "Graph",
    "GraphLoader",
    "Switch",
    "backend_names",
    "bound",
    "check_finite",
    "finite_outputs",
    "nonfinite_names",
    "open_backend",
]


class Graph(Protocol):
    """A loaded network as the pipeline sees it.

    run: feeds by the spec's input names (float32 / int64 NumPy arrays, shapes per the spec; TypeError or
    ValueError naming a wrong input) -> outputs by the spec's output names, arrays the caller owns. Outputs
    may hold NaN or inf (an overflow): callers that use them check with :func:`finite_outputs`.
    providers: what really runs it, e.g. ``["tensorrt:cuda-graph"]``; it changes when a CUDA-graph
    capture fails and the graph falls back to plain launches.
    """

    spec: GraphSpec

    @property
    def providers(self) -> list[str]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class BindsConstants(Protocol):
    """A graph that keeps inputs constant for a generation in its own (device) buffers.

    After ``bind_constants(c)``, ``run(varying)`` takes only the other inputs; the constants are copied to
    the device once (again only after a new bind or a shape change). ``unbind_constants`` forgets them.
    Graphs without device buffers need not implement this: :func:`bound` merges for them.
    """

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None: ...

    def unbind_constants(self) -> None: ...


GraphLoader = Callable[[Network], Graph]


class Backend(Protocol):
    """What every backend module exposes as ``open_engine``: an engine folder -> a loader of its graphs.

    options: the backend's options by name (see :mod:`engine.backends.options`); bad ones raise a one-line
    EngineError. A missing optional dependency raises MissingDependencyError.
    """

    def __call__(self, engine_dir: Path, manifest: Manifest, options: Mapping[str, Any]) -> GraphLoader: ...


class BackendName(str, Enum):
    """Every backend, by the name the CLI, the pipeline and the bench use."""

    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TORCH_CUDA = "torch-cuda"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"

    @property
    def info(self) -> BackendInfo:
        return BACKENDS[self]

    @property
    def runs_on_cpu(self) -> bool:
        """Whether the backend can run on the CPU (onnxruntime runs on either)."""
        return DeviceKind.CPU in self.info.devices

    @property
    def runs_on_cuda(self) -> bool:
        return DeviceKind.CUDA in self.info.devices

    @property
    def has_cuda_graphs(self) -> bool:
        """Whether the ``cuda_graph`` option means anything to this backend."""
        return self.info.cuda_graph

    @property
    def compiles(self) -> bool:
        """Whether the ``compile`` option (``torch.compile`` of the UNet) means anything to this backend."""
        return self.info.compiles

    @classmethod
    def parse(cls, name: BackendName | str) -> BackendName:
        """The backend of a name, or a one-line EngineError listing the valid names."""
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(backend_names())
            raise EngineError(f"unknown backend {name!r}; valid backends: {valid}") from None


@dataclass(frozen=True)
class BackendInfo:
    """What the registry knows about a backend without importing it.

    module: the module whose ``open_engine`` opens it; devices: where it can run (the first is its
    default); cuda_graph: whether it can replay networks as CUDA graphs; compiles: whether it can run the
    UNet through ``torch.compile`` (the ``compile`` option).
    """

    module: str
    devices: tuple[DeviceKind, ...]
    cuda_graph: bool
    summary: str
    compiles: bool = False


BACKENDS: Mapping[BackendName, BackendInfo] = {
    BackendName.ONNXRUNTIME: BackendInfo(
        "engine.backends.onnxruntime",
        (DeviceKind.CUDA, DeviceKind.CPU),
        True,
        "ONNX Runtime; CUDA when onnxruntime-gpu sees a GPU, else the CPU",
    ),
    BackendName.TORCH: BackendInfo(
        "engine.backends.torch_cpu",
        (DeviceKind.CPU,),
        False,
        "the source model in torch: the reference",
        compiles=True,
    ),
    BackendName.TORCH_CUDA: BackendInfo(
        "engine.backends.torch_cuda",
        (DeviceKind.CUDA,),
        True,
        "torch fp16 on an NVIDIA GPU, the UNet replayed as a CUDA graph",
        compiles=True,
    ),
    BackendName.TENSORRT: BackendInfo(
        "engine.backends.tensorrt", (DeviceKind.CUDA,), True, "TensorRT plans built by `sd-engine build`"
    ),
    BackendName.OPENVINO: BackendInfo(
        "engine.backends.openvino",
        (DeviceKind.CPU,),
        False,
        "OpenVINO on the CPU in bf16 (AMX / AVX512-BF16): about 3x fp32 ONNX Runtime",
    ),
}


def backend_names(device: DeviceKind | None = None) -> list[str]:
    """The backend names, in declaration order; with ``device``, only those that can run there."""
    return [name.value for name in BackendName if device is None or device in name.info.devices]


def open_backend(
    name: BackendName | str,
    engine_dir: str | Path,
    manifest: Manifest,
    options: Mapping[str, Any] | None = None,
) -> GraphLoader:
    """A loader of an engine folder's graphs on the named backend (its module is imported now).

    Raises a one-line EngineError for an unknown name, a device the backend cannot use, a CUDA graph on
    a CPU-only backend, or bad options; MissingDependencyError when the backend's library is missing.
    """
    backend = BackendName.parse(name)
    options = dict(options or {})
    check_common_options(backend, options)
    opener: Backend = importlib.import_module(backend.info.module).open_engine
    return opener(Path(engine_dir), manifest, options)


def check_common_options(backend: BackendName, options: Mapping[str, Any]) -> None:
    """The shared vocabulary checked once: a device the backend can use, cuda_graph and compile only where
    they mean something."""
    if options.get("device") is not None:
        try:
            device = Device.parse(options["device"])
        except ValueError as error:
            raise EngineError(f"bad {backend.value} backend options: {error}") from None
        if device.kind not in backend.info.devices:
            where = " or ".join(kind.value for kind in backend.info.devices)
            raise EngineError(f"the {backend.value} backend runs on {where}, not {device}")
    if "cuda_graph" in options and not backend.has_cuda_graphs:
        try:
            wanted = Switch.of(options["cuda_graph"])
        except ValueError:
            wanted = Switch.ON
        if wanted is Switch.ON:
            raise EngineError(f"cuda_graph: the {backend.value} backend runs on the CPU; use a GPU backend")
    if options.get("compile") is True and not backend.compiles:
        which = " or ".join(name.value for name in BackendName if name.compiles)
        raise EngineError(f"compile: the {backend.value} backend does not use torch.compile; use {which}")


@contextmanager
def bound(
    graph: Graph, constants: Mapping[str, np.ndarray]
) -> Iterator[Callable[..., dict[str, np.ndarray]]]:
    """Run a graph with inputs that stay the same for a whole generation bound once.

    Yields ``run(varying_feeds)``. A graph with device buffers (:class:`BindsConstants`) copies the
    constants to them once; for any other graph, each run merges them into the feeds. The constants are
    unbound on exit, error and cancellation included, so a generation never sees the previous one's.
    """
    if not isinstance(graph, BindsConstants):
        fixed = dict(constants)
        yield lambda varying: graph.run({**fixed, **varying})
        return
    graph.bind_constants(constants)
    try:
        yield graph.run
    finally:
        graph.unbind_constants()


# -- non-finite values ----------------------------------------------------------------------------------

# What a non-finite output usually means, for the error line.
OVERFLOW_HINT = (
    "the model overflowed on these inputs, or its weights are damaged (fp16 and bf16 overflow sooner)"
)


def nonfinite_names(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the float arrays holding a NaN or an inf, in order (one ``np.isfinite`` pass each)."""
    found = ((name, np.asarray(value)) for name, value in arrays.items())
    return [name for name, value in found if value.dtype.kind in "fc" and not np.isfinite(value).all()]


def check_finite(what: str, arrays: Mapping[str, np.ndarray], hint: str = OVERFLOW_HINT) -> None:
    """EngineError, one line naming ``what``, the first bad array and its NaN / inf counts, when a float
    array holds a non-finite value: a NaN turns into a black image, never an error, if nobody looks."""
    bad = nonfinite_names(arrays)
    if not bad:
        return
    value = np.asarray(arrays[bad[0]])
    nans = int(np.isnan(value).sum())
    infs = int(np.isinf(value).sum())
    also = f"; also in {', '.join(map(repr, bad[1:]))}" if len(bad) > 1 else ""
    raise EngineError(
        f"{what}: non-finite values in {bad[0]!r} ({nans} NaN and {infs} inf of {value.size}{also}); {hint}"
    )


def finite_outputs(graph: Graph, outputs: dict[str, np.ndarray], when: str = "") -> dict[str, np.ndarray]:
    """``outputs`` of ``graph.run``, unchanged, once every float output is finite; else EngineError naming
    the network, ``when`` (e.g. "at step 3/20"), what ran it and the output.

    The one check the pipeline makes after every graph call, whatever the backend (onnxruntime, openvino,
    torch, torch-cuda, tensorrt, CUDA-graph replays): outputs are host NumPy arrays by then. Cost: one
    ``np.isfinite(...).all()`` per output, measured at 5 us for SD 1.5's 512 px UNet output (2x4x64x64
    float32) and 0.1 ms for a 512 px image, against steps of milliseconds (GPU) to seconds (CPU).
    """
    where = f"{graph.spec.network.value}{' ' + when if when else ''} (on {', '.join(graph.providers)})"
    check_finite(where, outputs)
    return outputs
