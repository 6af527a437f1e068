"""The CUDA-graph wrapper every GPU backend shares, and the fp16 overflow guard.

A step of the sampling loop launches hundreds of kernels; recording them once into a CUDA graph and
replaying it turns that into one launch. Graphs replay fixed device addresses and fixed shapes, so
:class:`CudaGraphRunner` enforces the invariants in one place, whatever records the graph
(``torch.cuda.CUDAGraph`` in :mod:`engine.backends.torch_cuda`, ``cudaStreamBeginCapture`` around TensorRT's
``execute_async_v3`` in :mod:`engine.backends.tensorrt`):

1. static buffers: inputs are copied into buffers allocated once per shape key;
2. warm-up: the first ``warmup`` runs are plain launches (lazy initialisation, autotuning and TensorRT's
   deferred shape work must not be recorded);
3. capture once, then replay;
4. a new shape key, or :meth:`CudaGraphRunner.invalidate` after a reallocation, drops the graph (and,
   for a new shape, the buffers) before anything else runs.

Constants (:meth:`CudaGraphRunner.bind_constants`: a generation's prompt embeddings, guidance scale) are
written to their static buffers once per bind (and after a reallocation), outside any recorded graph;
each run then writes only the inputs it is given. ``RunnerStats.bytes_in`` counts the bytes written.

Buffer ownership: the runner owns every static buffer. ``run`` copies the caller's inputs in (the caller
keeps its arrays) and returns *views of the static output buffers*: they stay valid until the next
``run`` or ``reset`` on the same runner, which overwrite or free them. Copy what must outlive that; the
backends' ``Graph.run`` does, so the pipeline always gets arrays it owns.

This module imports only numpy: the device work lives behind :class:`GraphOps`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from engine.runtime import nonfinite_names
from engine.specs import GraphSpec

log = logging.getLogger(__name__)

BuffersT = TypeVar("BuffersT")
GraphT = TypeVar("GraphT")
ShapeKey = tuple[tuple[str, tuple[int, ...], str], ...]
# What static buffers and a captured graph are specific to: the shapes, and which inputs are constants.
RunnerKey = tuple[ShapeKey, frozenset[str]]


class GraphOps(Protocol[BuffersT, GraphT]):
    """The device work of one network on one backend; the runner decides when each step happens."""

    spec: GraphSpec

    def allocate(self, shapes: Mapping[str, tuple[int, ...]], constants: frozenset[str]) -> BuffersT:
        """Static input and output buffers (device, and pinned host where the backend stages copies).
        constants: the inputs written by write_constants, which a launch or graph must not copy."""
        ...

    def release(self, buffers: BuffersT) -> None: ...

    def write_inputs(self, buffers: BuffersT, feeds: Mapping[str, np.ndarray]) -> None:
        """Copy host arrays into the static input buffers (or their pinned staging, copied to the device
        by the launch or the graph)."""
        ...

    def write_constants(self, buffers: BuffersT, constants: Mapping[str, np.ndarray]) -> None:
        """Copy constants all the way to the device buffers now: no launch or graph copies them."""
        ...

    def launch(self, buffers: BuffersT) -> None:
        """One ordinary run on the static buffers."""
        ...

    def capture(self, buffers: BuffersT) -> GraphT:
        """Record one run on the static buffers into a replayable graph (recording runs nothing)."""
        ...

    def replay(self, graph: GraphT) -> None: ...

    def release_graph(self, graph: GraphT) -> None: ...

    def read_outputs(self, buffers: BuffersT) -> dict[str, Any]:
        """Wait for the run and return the static output buffers (views, see the module docstring)."""
        ...


def shape_key(feeds: Mapping[str, np.ndarray]) -> ShapeKey:
    """What a captured graph is specific to: every input's name, shape and dtype."""
    return tuple(
        (name, tuple(int(d) for d in value.shape), np.dtype(value.dtype).name)
        for name, value in sorted(feeds.items())
    )


@dataclass
class RunnerStats:
    """Counters that tests and benchmarks read: what the runner did so far."""

    launches: int = 0
    captures: int = 0
    replays: int = 0
    allocations: int = 0
    dropped_graphs: int = 0
    bytes_in: int = 0  # host bytes written into input buffers, constants included


class CudaGraphRunner(Generic[BuffersT, GraphT]):
    """Static buffers, warm-up, capture and replay for one network on one shape at a time.

    enabled=False keeps the static buffers and launches every run (the no-CUDA-graph baseline).
    capture_failed tells that a capture was tried and failed: the runner launches from then on.
    """

    def __init__(self, ops: GraphOps[BuffersT, GraphT], warmup: int = 1, enabled: bool = True) -> None:
        if warmup < 1:
            raise ValueError("warmup must be at least 1: the first run may not be captured")
        self.ops = ops
        self.warmup = warmup
        self.enabled = enabled
        self.capture_failed = False
        self.stats = RunnerStats()
        self.key: RunnerKey | None = None
        self.constants: dict[str, np.ndarray] = {}
        self._constants_written = False
        self._buffers: BuffersT | None = None
        self._graph: GraphT | None = None
        self._runs = 0

    @property
    def captured(self) -> bool:
        return self._graph is not None

    @property
    def replays_graphs(self) -> bool:
        """Whether runs are (or, after warm-up, will be) replays of a CUDA graph."""
        return self.enabled and not self.capture_failed

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        """Inputs every later run shares until :meth:`unbind_constants`; written on the next run only."""
        self.constants = dict(constants)
        self._constants_written = False

    def unbind_constants(self) -> None:
        self.constants = {}
        self._constants_written = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Copy feeds (and constants not yet written) in, launch or replay, return views of the static
        outputs."""
        key = (shape_key({**self.constants, **feeds}), frozenset(self.constants))
        if key != self.key or self._buffers is None:
            self.reset()
            shapes = {name: shape for name, shape, _ in key[0]}
            self._buffers = self.ops.allocate(shapes, key[1])
            self.key = key
            self.stats.allocations += 1
            self._constants_written = False
        buffers = self._buffers
        if not self._constants_written and self.constants:
            self.ops.write_constants(buffers, self.constants)
            self.stats.bytes_in += _nbytes(self.constants)
            self._constants_written = True
        self.ops.write_inputs(buffers, feeds)
        self.stats.bytes_in += _nbytes(feeds)
        if not self.enabled or self._runs < self.warmup:
            self.ops.launch(buffers)
            self.stats.launches += 1
        else:
            if self._graph is None:
                self._graph = self._capture(buffers)
            if self._graph is None:
                self.ops.launch(buffers)
                self.stats.launches += 1
            else:
                self.ops.replay(self._graph)
                self.stats.replays += 1
        self._runs += 1
        return self.ops.read_outputs(buffers)

    def _capture(self, buffers: BuffersT) -> GraphT | None:
        """Record the graph; when the network cannot be captured, warn once and launch from now on."""
        try:
            graph = self.ops.capture(buffers)
        except Exception as error:  # e.g. a TensorRT plan with data-dependent shapes or host syncs
            warnings.warn(
                f"{self.ops.spec.network.value}: CUDA graph capture failed ({error}); running without "
                "CUDA graphs",
                RuntimeWarning,
                stacklevel=3,
            )
            self.enabled = False
            self.capture_failed = True
            return None
        self.stats.captures += 1
        return graph

    def invalidate(self) -> None:
        """Drop the graph, keep the buffers: call after anything reallocated memory it recorded."""
        if self._graph is not None:
            self.ops.release_graph(self._graph)
            self._graph = None
            self.stats.dropped_graphs += 1
        self._runs = 0

    def reset(self) -> None:
        """Drop the graph and free the static buffers (the next run allocates and warms up again)."""
        self.invalidate()
        if self._buffers is not None:
            self.ops.release(self._buffers)
            self._buffers = None
        self.key = None


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.asarray(value).nbytes) for value in arrays.values())


def graph_providers(base: str, runners: Iterable[CudaGraphRunner[Any, Any]], requested: bool) -> list[str]:
    """A graph's providers as they really run: ``base:cuda-graph`` only while CUDA graphs were asked for
    and no runner's capture has failed."""
    replaying = requested and all(runner.replays_graphs for runner in runners)
    return [f"{base}:cuda-graph" if replaying else base]


class GuardedGraph:
    """An fp16 graph with an fp32 fallback: the SD VAE overflows in fp16 (NaN or black images).

    Runs the fp16 graph; when an output holds a non-finite value, warns and reruns in fp32. Constants
    bound to it are bound to both.
    """

    def __init__(self, primary: Any, fallback: Any) -> None:
        self.spec: GraphSpec = primary.spec
        self.primary = primary
        self.fallback = fallback
        self.fallbacks = 0

    @property
    def providers(self) -> list[str]:
        return [*self.primary.providers, "fp32-fallback"]

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        self.primary.bind_constants(constants)
        self.fallback.bind_constants(constants)

    def unbind_constants(self) -> None:
        self.primary.unbind_constants()
        self.fallback.unbind_constants()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.primary.run(feeds)
        bad = nonfinite_names(outputs)
        if not bad:
            return outputs
        self.fallbacks += 1
        warnings.warn(
            f"{self.spec.network.value}: fp16 output {bad} overflowed; reran in fp32",
            RuntimeWarning,
            stacklevel=2,
        )
        return self.fallback.run(feeds)
