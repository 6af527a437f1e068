"""The onnxruntime backend: ONNX graphs on the CPU or CUDA execution provider, with an optimized-graph cache.

A backend loads a graph file for a :class:`~engine.specs.GraphSpec`; the loaded :class:`Graph` checks
its inputs against the spec and returns outputs by the spec's names. The ONNX Runtime backend saves
ONNX Runtime's optimized graph once, keyed on content, runtime version, provider and machine, and
later loads it with optimizations off: a service then starts the SD 1.5 UNet in under a second
instead of 4-10 s.

On the CUDA provider a graph runs through IO binding by default (:class:`BoundRunner`): inputs are
copied into device buffers allocated once per input shape and outputs land in static device buffers,
so a run allocates no device memory for them (the host copies in and out remain). Those fixed
addresses are what ``cuda_graph=True`` needs: ONNX Runtime's own CUDA graph, one graph id per input
shape. Every run returns host arrays the caller owns.

This module imports only numpy, onnxruntime, the standard library and engine modules that do the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from engine.backends.cuda_graph import ShapeKey, shape_key
from engine.backends.options import CUDA, Device, DeviceKind, Switch, parse_backend_options
from engine.backends.weights import Merge, patched_model_bytes, stored_initializers
from engine.errors import EngineError, EngineFolderError, MissingDependencyError
from engine.hashing import graph_content_hash, json_digest
from engine.machine import machine_fingerprint, physical_cores
from engine.manifest import WeightRef, require_onnx
from engine.specs import GraphSpec, Network, check_inputs

if TYPE_CHECKING:
    from engine.manifest import Manifest

log = logging.getLogger(__name__)


GPU_INSTALL_HINT = 'pip install "sd-engine[gpu]"'


CACHED_MODEL = "model.onnx"


CACHED_DATA = "model.onnx.data"


CACHE_SIDECAR = "key.json"


# ONNX Runtime's Python errors share no base class below Exception.
_ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EPFail,
)


# ONNX Runtime's type strings of the dtypes specs use.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}


# How ONNX Runtime refuses enable_cuda_graph at session creation (control-flow nodes, or nodes off the
# CUDA EP); older releases say "graph capture feature".
_CAPTURE_REFUSED = re.compile(r"(cuda graph|graph capture) feature", re.IGNORECASE)


# RunOptions key of ONNX Runtime's CUDA-graph id: -1 runs without capture or replay, 0 is reserved.
GRAPH_ID_KEY = "gpu_graph_id"


NO_GRAPH = -1


class Provider(str, Enum):
    """ONNX Runtime execution providers the engine supports."""

    CPU = "CPUExecutionProvider"
    CUDA = "CUDAExecutionProvider"

    @property
    def device_type(self) -> str:
        """Where the provider's tensors live, as OrtValue and IO binding name it."""
        return "cuda" if self is Provider.CUDA else "cpu"


@dataclass(frozen=True)
class OrtOptions:
    """How ONNX Runtime sessions are made.

    device: ``cpu``, ``cuda`` or ``cuda:N``; None picks CUDA when onnxruntime-gpu provides it, else CPU.
    threads: intra-op threads; None uses the physical cores (hyper-threads slow fp32 GEMMs down).
    cache_optimized: save the optimized graph in the cache folder and reuse it on later loads.
    external_min_bytes: initializers at least this large go to the cached graph's data file
        (graphs over 2 GB cannot be one protobuf).
    io_binding: run through :class:`BoundRunner` (static buffers on the device, no per-run output
        allocation, constants copied once per generation); auto: on for CUDA, off for the CPU.
    cuda_graph: ONNX Runtime's CUDA graph (CUDA and io_binding only; device None then means CUDA): one
        graph captured per input shape, kept while the graph is loaded; auto: off.
    fused_attention: run a graph's ONNX Runtime variant (attention fused into MultiHeadAttention)
        where the engine folder has one; False runs the standard graph TensorRT builds from.
    """

    device: Device | None = None
    threads: int | None = None
    cache_optimized: bool = True
    external_min_bytes: int = 1024
    io_binding: Switch = Switch.AUTO
    cuda_graph: Switch = Switch.AUTO
    fused_attention: bool = True


@dataclass(frozen=True)
class Patch:
    """Replacement weights for one session: ``model``, the graph file's bytes with inline initializers
    overwritten (None: load the file itself), and ``external``, OrtValues for initializers the graph keeps
    in external data (ONNX Runtime reads them instead of the data file)."""

    model: bytes | None = None
    external: Mapping[str, ort.OrtValue] = field(default_factory=dict)


@dataclass(frozen=True)
class PatchedWeights:
    """A patch made on demand (merging weights costs seconds, so a cache hit skips it) and what
    identifies it for the cache (None: never cached), e.g. a digest of LoRA file hashes and multipliers."""

    make: Callable[[], Patch]
    identity: str | None = None


# Cached optimized graphs with patched weights kept per network (each is as large as the graph).
PATCHED_ENTRIES_KEPT = 4


def _touch(entry: Path) -> None:
    """Mark a cache entry as just used (its mtime orders :func:`_prune`)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


# A staging folder this old was left by a killed process (an optimization takes minutes at most).
STALE_STAGING_S = 3600.0


def _remove_stale_staging(cache_dir: Path) -> None:
    """Remove ``.tmp-*`` staging folders a killed process left behind (older than STALE_STAGING_S)."""
    now = time.time()
    for staging in cache_dir.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - staging.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(staging, ignore_errors=True)


def _prune(cache_dir: Path, prefix: str, keep: int) -> None:
    """Remove all but the ``keep`` most recently used entries named ``prefix*``."""
    entries = sorted(
        (path for path in cache_dir.glob(f"{prefix}*") if path.is_dir()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for stale in entries[keep:]:
        shutil.rmtree(stale, ignore_errors=True)


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime build."""
    return list(ort.get_available_providers())


@dataclass(frozen=True)
class CacheKey:
    """Everything an optimized graph depends on; its digest names the cache entry."""

    content_hash: str
    onnxruntime: str
    provider: str
    optimization: str
    machine: tuple[tuple[str, str], ...]

    def digest(self) -> str:
        return json_digest(self.to_json())

    def to_json(self) -> dict:
        data = asdict(self)
        data["machine"] = dict(self.machine)
        return data


@dataclass
class BoundShape:
    """The IO binding of one input shape: static input OrtValues, and static outputs once a run showed
    their shapes (empty until then). graph_id is ONNX Runtime's CUDA-graph id for this shape, or None.
    constants_version: the runner's constants generation last copied into these inputs (-1: none)."""

    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]
    run_options: ort.RunOptions
    graph_id: int | None
    outputs: dict[str, ort.OrtValue] = field(default_factory=dict)
    constants_version: int = -1


class BoundRunner:
    """Runs a session through IO binding on static buffers on its device, one set per input shape.

    Each run copies the caller's arrays into the shape's input OrtValues (allocated once, same addresses
    every run). The first run of a shape lets ONNX Runtime allocate the outputs, which shows their shapes;
    later runs write into static output OrtValues of those shapes. Without a CUDA graph, a new shape frees
    the previous shape's buffers.

    Constants (:meth:`bind_constants`, e.g. a generation's prompt embeddings) are copied into a shape's
    inputs once per bind; a run then copies only the inputs it is given. ``bytes_in`` counts every byte
    copied host -> device (for tests and benchmarks).

    With cuda_graph (the session made with enable_cuda_graph), each shape gets its own gpu_graph_id. Its
    first run uses id -1 (no capture: the outputs are not bound yet); in its second run ONNX Runtime makes
    its warm-up runs, captures and replays; later runs replay. ONNX Runtime keeps captured graphs for the
    session's lifetime and replays the addresses they recorded, so every shape's buffers stay allocated
    while the runner lives, and a shape coming back replays its graph.

    Ownership: the runner owns every OrtValue; run returns host copies the caller owns. Not thread-safe,
    and ONNX Runtime keeps CUDA graphs per thread: run a runner from one thread.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        output_names: Sequence[str],
        device_type: str,
        device_id: int = 0,
        cuda_graph: bool = False,
    ) -> None:
        self.output_names = list(output_names)
        self.device_type = device_type
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        self.current: BoundShape | None = None
        self.bytes_in = 0
        self.constants: dict[str, np.ndarray] = {}
        self._constants_version = 0
        self._session = session
        self._shapes: dict[ShapeKey, BoundShape] = {}
        self._graph_ids = itertools.count(1)
        self._first_run_options = _run_options(NO_GRAPH if cuda_graph else None)

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        """Inputs every later run shares, copied to a shape's buffers on its next run only."""
        self.constants = {name: np.ascontiguousarray(value) for name, value in constants.items()}
        self._constants_version += 1

    def unbind_constants(self) -> None:
        self.constants = {}
        self._constants_version += 1

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy feeds (and constants not yet copied) into the shape's static inputs, run, return host
        copies of the outputs by name."""
        bound = self._bind({**self.constants, **feeds})
        if bound.constants_version != self._constants_version:
            self._write(bound, self.constants)
            bound.constants_version = self._constants_version
        self._write(bound, feeds)
        if not bound.outputs:
            return self._first_run(bound)
        self._session.run_with_iobinding(bound.binding, bound.run_options)
        return _host_copies(self.output_names, [bound.outputs[name] for name in self.output_names])

    def _write(self, bound: BoundShape, feeds: Mapping[str, np.ndarray]) -> None:
        for name, value in feeds.items():
            array = np.ascontiguousarray(value)
            bound.inputs[name].update_inplace(array)
            self.bytes_in += array.nbytes

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> BoundShape:
        key = shape_key(feeds)
        bound = self._shapes.get(key)
        if bound is None:
            if not self.cuda_graph:
                self._shapes.clear()
                self.current = None  # the previous shape's buffers go now, before the new ones are made
            bound = self._allocate(feeds)
            self._shapes[key] = bound
        self.current = bound
        return bound

    def _allocate(self, feeds: Mapping[str, np.ndarray]) -> BoundShape:
        binding = self._session.io_binding()
        inputs = {}
        for name, value in feeds.items():
            inputs[name] = self._ortvalue(value.shape, value.dtype)
            binding.bind_ortvalue_input(name, inputs[name])
        graph_id = next(self._graph_ids) if self.cuda_graph else None
        return BoundShape(binding, inputs, _run_options(graph_id), graph_id)

    def _first_run(self, bound: BoundShape) -> dict[str, np.ndarray]:
        """Run with outputs ONNX Runtime allocates (never captured), then bind static ones of their shapes."""
        for name in self.output_names:
            bound.binding.bind_output(name, self.device_type, self.device_id)
        self._session.run_with_iobinding(bound.binding, self._first_run_options)
        results = _host_copies(self.output_names, bound.binding.get_outputs())
        bound.binding.clear_binding_outputs()
        for name, array in results.items():
            bound.outputs[name] = self._ortvalue(array.shape, array.dtype)
            bound.binding.bind_ortvalue_output(name, bound.outputs[name])
        return results

    def _ortvalue(self, shape: Sequence[int], dtype: np.dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), np.dtype(dtype).type, self.device_type, self.device_id
        )


class OrtGraph:
    """A network loaded into an ONNX Runtime session, checked to match its spec.

    loaded_from is the file the session read: the cached optimized graph whenever the cache was used;
    cache_hit tells whether that graph was already there (True) or made by this load (False).
    runner: runs through IO binding when given (see :class:`BoundRunner`), else through session.run.
    Bound constants (:meth:`bind_constants`) go to the runner's device buffers once; without a runner
    they are merged into every run's feeds.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: GraphSpec,
        loaded_from: Path,
        cache_hit: bool,
        runner: BoundRunner | None = None,
    ):
        _check_interface(session, spec, loaded_from)
        self.spec = spec
        self.providers: list[str] = list(session.get_providers())
        self.loaded_from = loaded_from
        self.cache_hit = cache_hit
        self.runner = runner
        self.constants: dict[str, np.ndarray] = {}
        self._session = session

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        """Inputs that stay the same until :meth:`unbind_constants` (checked with every run's feeds)."""
        self.constants = dict(constants)
        if self.runner is not None:
            self.runner.bind_constants(constants)

    def unbind_constants(self) -> None:
        self.constants = {}
        if self.runner is not None:
            self.runner.unbind_constants()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check feeds (with the bound constants) against the spec (TypeError/ValueError naming the
        input), then run."""
        merged = {**self.constants, **feeds}
        check_inputs(self.spec, merged)
        if self.runner is not None:
            return self.runner.run({name: feeds[name] for name in self.spec.input_names if name in feeds})
        outputs = self._session.run(self.spec.output_names, {n: merged[n] for n in self.spec.input_names})
        return dict(zip(self.spec.output_names, outputs, strict=True))


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU or a CUDA device: loads graph files (see :func:`open_engine` for a folder)."""

    name = "onnxruntime"

    def __init__(self, options: OrtOptions = OrtOptions()):
        self.options = options
        self.cuda_graph = Switch.of(options.cuda_graph).resolve(False)
        requested = options.device or (CUDA if self.cuda_graph else None)
        self.provider = _resolve_provider(requested)
        self.device_id = requested.index if requested is not None else 0
        self.io_binding = Switch.of(options.io_binding).resolve(self.provider is Provider.CUDA)
        _check_device_options(self.provider, self.io_binding, self.cuda_graph)
        self.threads = options.threads or physical_cores()

    def load(
        self,
        network_file: Path,
        spec: GraphSpec,
        cache_dir: Path | None = None,
        content_hash: str | None = None,
    ) -> OrtGraph:
        """Load a graph; with cache_dir, reuse (or make) its optimized form there.

        content_hash: the source's hash from the engine manifest, to avoid re-reading gigabytes.
        """
        network_file = Path(network_file)
        if not network_file.is_file():
            raise EngineFolderError(f"graph file {network_file} is missing")
        if cache_dir is None or not self.options.cache_optimized:
            session = self._session(network_file, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            return self._graph(session, spec, network_file, cache_hit=False)
        return self._load_cached(network_file, spec, Path(cache_dir), content_hash)

    def cache_key(self, network_file: Path, content_hash: str | None = None) -> CacheKey:
        """The key of network_file's optimized graph under this backend's options.

        The CUDA provider options this backend sets (device_id, enable_cuda_graph) change how the graph
        runs, not the optimized graph, so they are not in the key: with and without a CUDA graph share it.
        """
        return CacheKey(
            content_hash=content_hash or graph_content_hash(network_file),
            onnxruntime=ort.__version__,
            provider=self.provider.value,
            optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL.name,
            machine=tuple(sorted(machine_fingerprint(gpu=self.provider is Provider.CUDA).items())),
        )

    def _graph(
        self, session: ort.InferenceSession, spec: GraphSpec, loaded_from: Path, cache_hit: bool
    ) -> OrtGraph:
        runner = None
        if self.io_binding:
            device = self.provider.device_type
            runner = BoundRunner(session, spec.output_names, device, self.device_id, self.cuda_graph)
        return OrtGraph(session, spec, loaded_from, cache_hit, runner)

    def _load_cached(
        self,
        source: Path,
        spec: GraphSpec,
        cache_dir: Path,
        digest: str | None,
        patched: PatchedWeights | None = None,
    ) -> OrtGraph:
        """Open the cached optimized graph, making it first if absent or damaged; never a stale one.

        patched: the graph with replaced weights (LoRA), cached under its own key (the source's hash and
        the patch's identity) in an entry named ``<network>-patched-*``, of which the newest
        :data:`PATCHED_ENTRIES_KEPT` per network are kept; its weights are merged only on a miss."""
        key = self.cache_key(source, digest)
        prefix = spec.network.value
        if patched is not None:
            key = dataclasses.replace(key, content_hash=json_digest([key.content_hash, patched.identity]))
            prefix = f"{prefix}-patched"
        entry = cache_dir / f"{prefix}-{key.digest()}"
        if entry.is_dir() and (session := self._open_entry(entry, key)) is not None:
            _touch(entry)
            return self._graph(session, spec, entry / CACHED_MODEL, cache_hit=True)
        patch = patched.make() if patched is not None else None
        # Reopening what was just stored proves it loads here, and every load then runs the same graph.
        if (
            self._store_optimized(source, entry, key, patch)
            and (session := self._open_entry(entry, key)) is not None
        ):
            if patched is not None:
                _prune(cache_dir, f"{prefix}-", PATCHED_ENTRIES_KEPT)
            return self._graph(session, spec, entry / CACHED_MODEL, cache_hit=False)
        session = self._session(source, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, patch=patch)
        return self._graph(session, spec, source, cache_hit=False)

    def _open_entry(self, entry: Path, key: CacheKey) -> ort.InferenceSession | None:
        """Session on a cached optimized graph; None (entry removed, with a warning) if it is damaged."""
        problem = _entry_problem(entry, key)
        if problem is None:
            try:
                return self._session(entry / CACHED_MODEL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            except EngineFolderError as error:
                problem = str(error)
        warnings.warn(
            f"discarding damaged optimized-graph cache {entry}: {problem}", RuntimeWarning, stacklevel=2
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def _store_optimized(self, source: Path, entry: Path, key: CacheKey, patch: Patch | None = None) -> bool:
        """Optimize source into a temporary folder, renamed to entry once complete; False if not stored.

        The cached .onnx names its data file by a relative path, so the pair moves as one folder.
        """
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(entry.parent)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        except OSError as error:
            log.warning(
                "optimized-graph cache %s is not writable (%s); loading without it", entry.parent, error
            )
            return False
        try:
            self._session(source, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, save_to=staging, patch=patch)
            _write_sidecar(staging, key, source)
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the entry from services running as other users
            os.rename(staging, entry)
            return True
        except EngineFolderError as error:  # a bad source fails again when loaded plainly, and raises then
            log.warning("optimizing %s into the cache failed (%s); retrying without the cache", source, error)
            return False
        except OSError as error:
            if entry.is_dir():  # another process stored the same key first
                return True
            log.warning("could not store the optimized graph of %s at %s: %s", source, entry, error)
            return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _session(
        self,
        path: Path,
        level: ort.GraphOptimizationLevel,
        save_to: Path | None = None,
        patch: Patch | None = None,
    ) -> ort.InferenceSession:
        """A session on ``path`` (with ``patch``: its patched bytes and external initializers instead)."""
        options = _session_options(self.threads, level)
        if save_to is not None:
            options.optimized_model_filepath = str(save_to / CACHED_MODEL)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", CACHED_DATA
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                str(self.options.external_min_bytes),
            )
        source: str | bytes = str(path)
        if patch is not None:
            if patch.external:
                options.add_external_initializers(list(patch.external), list(patch.external.values()))
            source = patch.model if patch.model is not None else source
        providers: list[str | tuple[str, dict[str, str]]] = [Provider.CPU.value]
        if self.provider is Provider.CUDA:
            # Nodes the GPU provider lacks fall back to the CPU (with a CUDA graph, only shape nodes may).
            providers.insert(0, (Provider.CUDA.value, self._cuda_options()))
        try:
            return ort.InferenceSession(source, options, providers=providers)
        except _ORT_ERRORS as error:
            raise _load_error(path, error, self.cuda_graph) from error

    def load_patched(
        self,
        network_file: Path,
        spec: GraphSpec,
        patched: PatchedWeights,
        cache_dir: Path | None = None,
        content_hash: str | None = None,
    ) -> OrtGraph:
        """A graph with some initializers replaced (LoRA). With cache_dir, its optimized form is stored
        and reused like the exported graph's (keyed on the patch's identity too), so a LoRA set seen
        before loads in about the time of the base graph, in as much memory; the exported graph's own
        entry is never touched. ONNX Runtime copies the patch's bytes and arrays into the session."""
        network_file = Path(network_file)
        if cache_dir is None or not self.options.cache_optimized or patched.identity is None:
            session = self._session(
                network_file, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, patch=patched.make()
            )
            return self._graph(session, spec, network_file, cache_hit=False)
        return self._load_cached(network_file, spec, Path(cache_dir), content_hash, patched)

    def _cuda_options(self) -> dict[str, str]:
        """CUDA provider options: the device, and ONNX Runtime's CUDA graph when asked for."""
        options = {"device_id": str(self.device_id)}
        if self.cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options


def _resolve_provider(requested: Device | None) -> Provider:
    """The provider of a device; CUDA must be present (ONNX Runtime would silently fall back to CPU)."""
    available = available_providers()
    if requested is None:
        return Provider.CUDA if Provider.CUDA.value in available else Provider.CPU
    provider = Provider.CUDA if requested.kind is DeviceKind.CUDA else Provider.CPU
    if provider.value not in available:
        raise MissingDependencyError(
            f"ONNX Runtime provider {provider.value} is not available for device {requested} (have "
            f"{available}); install onnxruntime-gpu: {GPU_INSTALL_HINT}"
        )
    return provider


def _check_device_options(provider: Provider, io_binding: bool, cuda_graph: bool) -> None:
    """Refuse option combinations that cannot work, rather than ignoring one of them."""
    if cuda_graph and provider is not Provider.CUDA:
        raise EngineError(f"cuda_graph needs device cuda ({Provider.CUDA.value}), not {provider.value}")
    if cuda_graph and not io_binding:
        raise EngineError("cuda_graph needs io_binding: a CUDA graph replays fixed input and output memory")


def open_engine(engine_dir: Path, manifest: Manifest, options: Mapping[str, Any]) -> OrtEngine:
    """A loader of the engine folder's graphs (options: see :class:`OrtOptions`); the attention-fused
    variant where the folder has one, optimized graphs cached under ``ENGINE_DIR/.cache/onnxruntime``.
    A folder exported ``--torch-only`` has no graphs to load: one-line EngineFolderError."""
    require_onnx(engine_dir, manifest, "the onnxruntime backend")
    backend = OnnxRuntimeBackend(parse_backend_options(OrtOptions, options, "onnxruntime"))
    return OrtEngine(Path(engine_dir), manifest, backend)


class OrtEngine:
    """Loads an engine folder's graphs on one :class:`OnnxRuntimeBackend`; patchable (see
    :class:`engine.backends.weights.Patchable`): a patched graph is a new session beside the base one."""

    in_place = False

    def __init__(self, engine_dir: Path, manifest: Manifest, backend: OnnxRuntimeBackend) -> None:
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.backend = backend
        self.cache_dir = engine_dir / ".cache" / "onnxruntime"

    def _chosen(self, network: Network) -> tuple[str, str | None, Mapping[str, WeightRef]]:
        """(file, content hash, weight map) of the graph this backend runs for a network."""
        entry = self.manifest.graphs[network]
        variant = entry.onnxruntime if entry.onnxruntime and self.backend.options.fused_attention else None
        if variant is not None:
            return variant.file, variant.sha256, variant.weights
        return str(entry.file), entry.sha256, entry.weights

    def __call__(self, network: Network) -> OrtGraph:
        file, digest, _ = self._chosen(network)
        spec = self.manifest.graphs[network].spec
        return self.backend.load(self.engine_dir / file, spec, cache_dir=self.cache_dir, content_hash=digest)

    def lora_targets(self, network: Network) -> dict[str, tuple[int, ...]]:
        return {target: ref.shape for target, ref in self._chosen(network)[2].items()}

    def load_patched(
        self, network: Network, targets: Collection[str], merge: Merge, identity: str | None = None
    ) -> OrtGraph:
        if not targets:
            return self(network)
        file, digest, refs = self._chosen(network)
        path = self.engine_dir / file
        used = {refs[target].initializer: refs[target] for target in targets}
        inline = {name: ref for name, ref in used.items() if ref.file == file}
        if inline and self.manifest.graphs[network].external_data:
            raise EngineFolderError(
                f"{path}: LoRA weights stored inline in a graph with external data cannot be patched; "
                "re-export the model"
            )

        def make() -> Patch:
            values = stored_initializers(self.engine_dir, refs, targets, merge)
            model = patched_model_bytes(path, inline, values) if inline else None
            external = {n: ort.OrtValue.ortvalue_from_numpy(values[n]) for n in used if n not in inline}
            return Patch(model, external)

        spec = self.manifest.graphs[network].spec
        patched = PatchedWeights(make, identity)
        return self.backend.load_patched(path, spec, patched, self.cache_dir, digest)


def _load_error(path: Path, error: Exception, cuda_graph: bool) -> EngineError:
    """A one-line error for a session ONNX Runtime would not make; a refused CUDA graph is not a bad file."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if cuda_graph and _CAPTURE_REFUSED.search(str(error)):
        return EngineError(
            f"ONNX Runtime cannot run {path} as a CUDA graph: {first_line}; use cuda_graph=False"
        )
    return EngineFolderError(f"ONNX Runtime cannot load {path}: {first_line}")


def _run_options(graph_id: int | None) -> ort.RunOptions:
    """RunOptions naming ONNX Runtime's CUDA graph for a run (None: the session has none)."""
    options = ort.RunOptions()
    if graph_id is not None:
        options.add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
    return options


def _host_copies(names: Sequence[str], values: Sequence[ort.OrtValue]) -> dict[str, np.ndarray]:
    """Host arrays the caller owns (OrtValue.numpy() of a CPU value is a view of ONNX Runtime's memory)."""
    return {name: np.array(value.numpy(), copy=True) for name, value in zip(names, values, strict=True)}


def _session_options(threads: int, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    """Measured best on the CPU: sequential executor, one inter-op thread, arena and memory pattern on."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return options


def _check_interface(session: ort.InferenceSession, spec: GraphSpec, path: Path) -> None:
    """A graph whose input/output names or dtypes differ from its spec belongs to another engine version."""
    inputs = {node.name: _ORT_DTYPES.get(node.type, node.type) for node in session.get_inputs()}
    wanted = {tensor.name: tensor.dtype for tensor in spec.inputs}
    outputs = {node.name for node in session.get_outputs()}
    missing_outputs = [name for name in spec.output_names if name not in outputs]
    if inputs != wanted or missing_outputs:
        raise EngineFolderError(
            f"{path} does not match the {spec.network.value} spec: graph inputs {inputs}, spec inputs "
            f"{wanted}; spec outputs missing from the graph {missing_outputs}"
        )


def _entry_problem(entry: Path, key: CacheKey) -> str | None:
    """Why a cache entry cannot be used (cheap checks: sidecar key and file sizes), or None."""
    try:
        sidecar = json.loads((entry / CACHE_SIDECAR).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {CACHE_SIDECAR}: {error}"
    if sidecar.get("key") != key.to_json():
        return "its key does not match"
    for name, size in sidecar.get("sizes", {}).items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def _write_sidecar(staging: Path, key: CacheKey, source: Path) -> None:
    sizes = {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}
    if CACHED_MODEL not in sizes:
        raise OSError(f"ONNX Runtime wrote no {CACHED_MODEL} into {staging}")
    sidecar = {"digest": key.digest(), "key": key.to_json(), "source": str(source), "sizes": sizes}
    (staging / CACHE_SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
