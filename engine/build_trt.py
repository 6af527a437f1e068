"""ONNX -> TensorRT plans: shape profiles from the spec tables, fp16, a content-keyed plan cache.

``sd-engine build ENGINE_DIR`` turns every ONNX graph of an engine folder into a serialized TensorRT
plan in ``ENGINE_DIR/tensorrt/``. The text encoder and UNet build in fp16; the VAE stays fp32 (the SD
VAE overflows in fp16) unless ``--vae fp16-guarded`` also builds an fp16 plan that the runtime falls
back from when its output is not finite. Optimization profiles are computed from the same
:mod:`engine.specs` tables as the export, so a profile cannot name an input the graph lacks.

Each plan has a sidecar JSON with its :class:`PlanKey`: the ONNX content hash, precision, profile
shapes, builder flags, TensorRT version and GPU. A plan whose sidecar is missing, corrupt or keyed
differently is rebuilt (or, with ``--no-rebuild``, refused), never used. The timing cache persists
between builds. After each build a parity gate (polygraphy runs TensorRT and ONNX Runtime on the same
random inputs) records its numbers in the manifest; a plan that fails it is deleted and not indexed.

Pure parts (profiles, keys, sidecars, error messages) need neither TensorRT nor a GPU; tensorrt and
cuda-python are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError, EngineFolderError, MissingDependencyError, ParityError
from engine.manifest import Manifest, read_manifest, write_manifest
from engine.specs import (
    GraphSpec,
    ModelDims,
    Network,
    Precision,
    axis_sizes,
    sample_inputs,
)

log = logging.getLogger(__name__)

MAX_KEPT_ERRORS = 50  # TensorRT errors kept for the next failure message

TRT_INSTALL_HINT = 'pip install "sd-engine[tensorrt]"'
PLAN_DIR = "tensorrt"
INDEX_NAME = "plans.json"
KEY_VERSION = 1
GIB = 1 << 30
DEFAULT_WORKSPACE_GIB = 8.0
DEFAULT_OPT_LEVEL = 3
# Relative L2 a plan may have against ONNX Runtime. fp32 plans run TF32 matmuls (TensorRT's default).
PARITY_THRESHOLDS = {Precision.FP16: 2e-2, Precision.FP32: 5e-3}
OOM_PATTERNS = re.compile(
    r"out of memory|outofmemory|could not be allocated|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY"
    r"|insufficient memory|failed to allocate",
    re.IGNORECASE,
)

Range = tuple[int, int, int]


class BuildError(EngineError):
    """A TensorRT plan could not be built (parser or builder failure), or a plan may not be used."""


class BuildOutOfMemoryError(BuildError):
    """The GPU ran out of memory while TensorRT built a plan."""


class ProfileKind(str, Enum):
    STATIC = "static"  # min = opt = max: the fastest kernels, one profile per (batch, size)
    DYNAMIC = "dynamic"  # one profile spanning ranges of batch, height and width


class VaePrecision(str, Enum):
    FP32 = "fp32"
    FP16_GUARDED = "fp16-guarded"  # fp16 plan plus an fp32 plan to rerun on overflow


# -- shape profiles ----------------------------------------------------------------------------


def _check_range(name: str, values: Range, multiple: int = 1) -> Range:
    low, opt, high = (int(v) for v in values)
    if not 0 < low <= opt <= high:
        raise BuildError(f"{name} range must satisfy 0 < min <= opt <= max, got {list(values)}")
    bad = [v for v in (low, opt, high) if v % multiple]
    if bad:
        raise BuildError(f"{name} must be a multiple of {multiple}, got {bad[0]}")
    return low, opt, high


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile in request terms: images per request and pixel sizes.

    Each field is (min, opt, max). ``sequence`` is the text length the UNet sees (77 tokens per prompt
    chunk; 154 and more for long prompts). Heights and widths are pixels, multiples of 8.
    """

    batch: Range
    height: Range
    width: Range
    sequence: Range = (77, 77, 77)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", _check_range("batch", self.batch))
        object.__setattr__(self, "height", _check_range("height", self.height, 8))
        object.__setattr__(self, "width", _check_range("width", self.width, 8))
        object.__setattr__(self, "sequence", _check_range("sequence", self.sequence))

    @classmethod
    def static(cls, batch: int, height: int, width: int, sequence: int = 77) -> ShapeProfile:
        return cls((batch,) * 3, (height,) * 3, (width,) * 3, (sequence,) * 3)

    @property
    def is_static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width, self.sequence))

    @property
    def label(self) -> str:
        """Short name for logs and file listings, e.g. ``b1-512x512`` or ``b1..4-256x256..1024x1024``."""

        def span(values: Range) -> str:
            return str(values[0]) if values[0] == values[2] else f"{values[0]}..{values[2]}"

        sizes = f"{self.width[0]}x{self.height[0]}"
        if (self.width[0], self.height[0]) != (self.width[2], self.height[2]):
            sizes += f"..{self.width[2]}x{self.height[2]}"
        text = "" if self.sequence == (77, 77, 77) else f"-t{span(self.sequence)}"
        return f"b{span(self.batch)}-{sizes}{text}"

    def to_json(self) -> dict[str, list[int]]:
        return {k: list(getattr(self, k)) for k in ("batch", "height", "width", "sequence")}


def make_profiles(
    kind: ProfileKind,
    batches: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    max_tokens: int = 77,
    min_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
) -> tuple[ShapeProfile, ...]:
    """Profiles covering batches x sizes ((width, height) pixels); the first batch and size are opt.

    Static: one profile per (batch, size). Dynamic: one profile from the smallest to the largest of
    each (or min_size / max_size). Text longer than 77 tokens makes the sequence axis dynamic.
    """
    if not batches or not sizes:
        raise BuildError("at least one batch size and one image size are needed")
    sequence = (77, 77, max_tokens)
    if kind is ProfileKind.STATIC:
        return tuple(
            ShapeProfile((b,) * 3, (h,) * 3, (w,) * 3, sequence)
            for b in batches
            for w, h in dict.fromkeys(sizes)
        )
    (opt_w, opt_h), opt_b = sizes[0], batches[0]
    low_w, low_h = min_size or (min(w for w, _ in sizes), min(h for _, h in sizes))
    high_w, high_h = max_size or (max(w for w, _ in sizes), max(h for _, h in sizes))
    return (
        ShapeProfile(
            (min(batches), opt_b, max(batches)),
            (min(low_h, opt_h), opt_h, max(high_h, opt_h)),
            (min(low_w, opt_w), opt_w, max(high_w, opt_w)),
            sequence,
        ),
    )


def network_batch(network: Network, profile: ShapeProfile) -> Range:
    """The batch axis of one network for a profile.

    UNet: from the images (guidance off) to 2 x images (guidance with rescale, which the
    fused-guidance UNet cannot do); opt at 2 x images. Text encoder: 1 up to the images, since the
    pipeline encodes only prompts its embedding cache lacks. VAE and the fused-guidance UNet (whose
    embeddings' batch is twice this): the images.
    """
    low, opt, high = profile.batch
    if network is Network.UNET:
        return low, 2 * opt, 2 * high
    if network is Network.TEXT_ENCODER:
        return 1, opt, high
    return low, opt, high


def axis_ranges(network: Network, profile: ShapeProfile, dims: ModelDims) -> tuple[dict[str, int], ...]:
    """(min, opt, max) sizes of every symbolic axis of the specs for one network and profile."""
    factor = dims.vae_scale_factor
    for name, values in (("height", profile.height), ("width", profile.width)):
        bad = [v for v in values if v % factor]
        if bad:
            raise BuildError(f"image {name} {bad[0]} is not a multiple of the VAE scale factor {factor}")
    chunk = dims.text_max_length
    if any(v % chunk for v in profile.sequence):
        raise BuildError(f"text sequence {list(profile.sequence)} must be multiples of {chunk} tokens")
    batch = network_batch(network, profile)
    return tuple(
        axis_sizes(
            batch[i], profile.height[i] // factor, profile.width[i] // factor, factor, profile.sequence[i]
        )
        for i in range(3)
    )


def profile_shapes(
    spec: GraphSpec, profile: ShapeProfile, dims: ModelDims
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min / opt / max shape of every input with a symbolic axis, straight from the spec table."""
    sizes = axis_ranges(spec.network, profile, dims)
    return {
        tensor.name: tuple(tensor.shape(s) for s in sizes)  # type: ignore[misc]
        for tensor in spec.inputs
        if tensor.symbols()
    }


# -- the plan cache ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int = 0

    @property
    def description(self) -> str:
        return f"{self.name} (compute {self.compute_capability})"


@dataclass(frozen=True)
class PlanTarget:
    """One plan to build: a network at a precision; strongly typed when the ONNX is already fp16."""

    network: Network
    precision: Precision
    strongly_typed: bool = False

    @property
    def name(self) -> str:
        return f"{self.network.value}-{self.precision.value}"


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; a plan is used only when its sidecar holds this exact key."""

    network: str
    onnx_sha256: str
    precision: str
    strongly_typed: bool
    profiles: tuple[tuple[tuple[str, tuple[tuple[int, ...], ...]], ...], ...]
    refit: bool
    workspace_bytes: int
    optimization_level: int
    tensorrt: str
    gpu: str
    compute_capability: str
    key_version: int = KEY_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["profiles"] = [{name: [list(s) for s in shapes] for name, shapes in p} for p in self.profiles]
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def plan_key(
    target: PlanTarget,
    spec: GraphSpec,
    onnx_sha256: str,
    profiles: Sequence[ShapeProfile],
    dims: ModelDims,
    settings: BuildSettings,
    tensorrt_version: str,
    gpu: GpuInfo,
) -> PlanKey:
    shapes = tuple(tuple(sorted(profile_shapes(spec, p, dims).items())) for p in profiles)
    return PlanKey(
        network=target.network.value,
        onnx_sha256=onnx_sha256,
        precision=target.precision.value,
        strongly_typed=target.strongly_typed,
        profiles=shapes,
        refit=settings.refit,
        workspace_bytes=settings.workspace_bytes,
        optimization_level=settings.optimization_level,
        tensorrt=tensorrt_version,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
    )


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(plan: Path) -> dict[str, Any]:
    """The sidecar of a plan; BuildError saying what is wrong when it is missing or corrupt."""
    path = sidecar_path(plan)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BuildError(f"{path.name} is corrupt ({error})") from None
    fields = {"digest": str, "key": dict, "plan_bytes": int, "plan_sha256": str, "parity": dict}
    for field, kind in fields.items():
        if not isinstance(data, dict) or not isinstance(data.get(field), kind):
            raise BuildError(f"{path.name} is corrupt (bad or missing '{field}')")
    return data


def key_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Why a stored key differs from the wanted one, in words; None when they are equal."""
    if dict(old) == dict(new):
        return None
    env = ("tensorrt", "gpu", "compute_capability")
    if any(old.get(k) != new.get(k) for k in env):
        return (
            f"it was built with TensorRT {old.get('tensorrt')} on {old.get('gpu')} "
            f"(compute {old.get('compute_capability')}); this machine has TensorRT {new.get('tensorrt')} "
            f"on {new.get('gpu')} (compute {new.get('compute_capability')})"
        )
    words = {
        "onnx_sha256": "the ONNX graph changed",
        "precision": "the precision changed",
        "strongly_typed": "the ONNX precision changed",
        "profiles": "the shape profiles changed",
        "refit": "the refittable flag changed",
        "workspace_bytes": "the workspace size changed",
        "optimization_level": "the builder optimization level changed",
        "network": "it is another network's plan",
        "key_version": "it has an older key format",
    }
    changed = [words.get(k, f"{k} changed") for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed)


def plan_problem(plan: Path, key: PlanKey, verify_bytes: bool = True) -> str | None:
    """Why the cached plan cannot be used for key (None: it can). Never trusts file existence alone."""
    if not plan.is_file():
        return "there is no plan yet"
    try:
        sidecar = read_sidecar(plan)
    except BuildError as error:
        return str(error)
    mismatch = key_mismatch(sidecar["key"], key.to_json())
    if mismatch is not None or sidecar["digest"] != key.digest():
        return mismatch or "its sidecar digest does not match its key"
    if plan.stat().st_size != sidecar["plan_bytes"]:
        return "the plan file is truncated"
    if verify_bytes and file_sha256(plan) != sidecar["plan_sha256"]:
        return "the plan file is corrupt (sha256 differs from its sidecar)"
    if not sidecar["parity"].get("passed", False):
        return "it failed its parity gate"
    return None


def needs_build(plan: Path, key: PlanKey, force: bool = False, no_rebuild: bool = False) -> str | None:
    """The reason to build this plan, or None to reuse it; with no_rebuild a needed build raises."""
    problem = "--force was given" if force else plan_problem(plan, key)
    if problem is not None and no_rebuild:
        raise BuildError(
            f"TensorRT plan {plan} cannot be used: {problem}; --no-rebuild was given "
            "(run `sd-engine build` without it)"
        )
    return problem


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a plan."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecar(plan: Path, key: PlanKey, plan_bytes: bytes, extra: Mapping[str, Any]) -> None:
    data = {
        "digest": key.digest(),
        "key": key.to_json(),
        "plan": plan.name,
        "plan_bytes": len(plan_bytes),
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        **extra,
    }
    write_atomic(sidecar_path(plan), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# -- what to build -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """How plans are built.

    ``networks`` None: every network of the engine folder, except that a folder with the fused-guidance
    UNet (unet_cfg) gets that plan and not the plain UNet's: sampling with guidance, the usual case, needs
    only one UNet plan. Ask for ``unet`` too to run with guidance off or with guidance_rescale.
    """

    profiles: tuple[ShapeProfile, ...] = (ShapeProfile.static(1, 512, 512),)
    networks: tuple[Network, ...] | None = None
    vae_precision: VaePrecision = VaePrecision.FP32
    refit: bool = False
    workspace_bytes: int = int(DEFAULT_WORKSPACE_GIB * GIB)
    optimization_level: int = DEFAULT_OPT_LEVEL
    timing_cache: Path | None = None  # None: ENGINE_DIR/tensorrt/timing-<trt>-<gpu>.cache
    force: bool = False
    no_rebuild: bool = False
    parity_seed: int | None = None


def plan_targets(manifest: Manifest, settings: BuildSettings) -> list[PlanTarget]:
    """The plans to build: fp16 text encoder and UNet; fp32 VAE, plus fp16 when guarded."""
    networks = settings.networks if settings.networks is not None else default_networks(manifest)
    missing = [n.value for n in networks if n not in manifest.graphs]
    if missing:
        raise EngineFolderError(f"the engine folder has no ONNX graph for {missing}")
    targets = []
    for network in networks:
        typed = manifest.graphs[network].precision is Precision.FP16
        if network in (Network.VAE_DECODER, Network.VAE_ENCODER):
            if settings.vae_precision is VaePrecision.FP16_GUARDED:
                targets.append(PlanTarget(network, Precision.FP16, typed))
            targets.append(PlanTarget(network, Precision.FP32, typed))
        else:
            targets.append(PlanTarget(network, Precision.FP16, typed))
    return targets


def default_networks(manifest: Manifest) -> tuple[Network, ...]:
    """Every network of the folder; the fused-guidance UNet replaces the plain one when present."""
    fused = Network.UNET_CFG in manifest.graphs
    return tuple(n for n in manifest.graphs if not (fused and n is Network.UNET))


def plan_index(targets: Sequence[PlanTarget], passed: Mapping[str, bool]) -> dict[str, Any]:
    """plans.json: per network, the plan the runtime uses and its fp32 fallback (guarded VAE)."""
    networks: dict[str, dict[str, str | None]] = {}
    for network in dict.fromkeys(t.network for t in targets):
        ok = [t for t in targets if t.network is network and passed.get(t.name)]
        if not ok:
            continue
        fp16 = [t for t in ok if t.precision is Precision.FP16]
        fp32 = [t for t in ok if t.precision is Precision.FP32]
        primary = (fp16 or fp32)[0]
        fallback = fp32[0] if fp16 and fp32 else None
        networks[network.value] = {
            "plan": f"{primary.name}.plan",
            "fallback": f"{fallback.name}.plan" if fallback else None,
        }
    return {"format_version": 1, "networks": networks}


def merge_index(old: Mapping[str, Any], new: Mapping[str, Any], built: Sequence[Network]) -> dict[str, Any]:
    """plans.json after a build of some networks: theirs replaced (or dropped if failed), the rest kept."""
    networks = {k: v for k, v in old.items() if k not in {n.value for n in built}}
    networks.update(new["networks"])
    return {**new, "networks": dict(sorted(networks.items()))}


def read_plan_index(engine_dir: Path) -> dict[str, dict[str, str | None]]:
    path = engine_dir / PLAN_DIR / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        networks = data["networks"]
        if not isinstance(networks, dict):
            raise TypeError("networks is not an object")
    except FileNotFoundError:
        raise EngineFolderError(
            f"{engine_dir} has no TensorRT plans; build them with `sd-engine build {engine_dir}`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EngineFolderError(f"corrupt {path}: {error}; rebuild with `sd-engine build`") from None
    return networks


def default_timing_cache(plan_dir: Path, tensorrt_version: str, gpu: GpuInfo) -> Path:
    gpu_tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-").lower()
    return plan_dir / f"timing-trt{tensorrt_version}-{gpu_tag}-sm{gpu.compute_capability}.cache"


# -- environment: tensorrt, cuda-python, the GPU ------------------------------------------------


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed (import tensorrt failed): {TRT_INSTALL_HINT} on a machine with "
            "an NVIDIA GPU"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (13.x) or ``cuda.cudart`` (12.x)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise MissingDependencyError(
                "cuda-python is not installed (import cuda.bindings / cuda.cudart failed): "
                + TRT_INSTALL_HINT
            ) from None
    return runtime


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple; EngineError naming the call on failure."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        raise EngineError(f"CUDA call {what} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def detect_gpu(cudart: Any, device: int = 0) -> GpuInfo:
    """Name and compute capability of one GPU; one-line error when there is none."""
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count == 0:
        reason = getattr(error, "name", str(error)) if int(error) != 0 else "0 devices"
        raise MissingDependencyError(
            f"no CUDA GPU found (cudaGetDeviceCount: {reason}); TensorRT needs an NVIDIA GPU and driver"
        )
    if not 0 <= device < count:
        raise EngineError(f"CUDA device {device} does not exist (this machine has {count})")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\0 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def check_environment(device: int = 0) -> tuple[Any, Any, GpuInfo]:
    """tensorrt, cuda-python's runtime and the GPU, or one line saying which is missing."""
    trt = import_tensorrt()
    cudart = import_cudart()
    try:
        import polygraphy  # noqa: F401  (the parity gate runs TensorRT and ONNX Runtime through it)
    except ImportError:
        raise MissingDependencyError(f"polygraphy is not installed: {TRT_INSTALL_HINT}") from None
    gpu = detect_gpu(cudart, device)
    cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
    # Plans whose ONNX used plugin ops (e.g. GroupNorm in some exports) need the plugin registry.
    trt.init_libnvinfer_plugins(trt_logger(trt), "")
    return trt, cudart, gpu


# -- building ----------------------------------------------------------------------------------


def build_failure(
    network: Network, messages: Sequence[str], profiles: Sequence[ShapeProfile], workspace: int
) -> BuildError:
    """The error for a failed build: out of memory gets its own message and a smaller-profile hint."""
    labels = ", ".join(p.label for p in profiles)
    text = " | ".join(m.strip().splitlines()[0] for m in messages if m.strip()) or "no message from TensorRT"
    if OOM_PATTERNS.search(text):
        return BuildOutOfMemoryError(
            f"out of GPU memory while building the {network.value} plan for profiles [{labels}] "
            f"(workspace {workspace / GIB:.1f} GiB): build a smaller profile (fewer or smaller --batch / "
            "--size, --profile static) or pass a smaller --workspace"
        )
    return BuildError(f"TensorRT could not build the {network.value} plan for [{labels}]: {text[:400]}")


@functools.cache
def trt_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors for the failure message and forwards warnings to logging.

    One per process: TensorRT registers the first logger it sees globally and warns about others.
    """

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                del self.errors[:-MAX_KEPT_ERRORS]  # a long-running service logs through this one too
                log.error("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("tensorrt: %s", msg)
            else:
                log.debug("tensorrt: %s", msg)

    return Logger()


def build_plan(
    trt: Any,
    onnx_path: Path,
    target: PlanTarget,
    shapes: Sequence[Mapping[str, tuple[tuple[int, ...], ...]]],
    profiles: Sequence[ShapeProfile],
    settings: BuildSettings,
    timing_cache: bytes,
) -> tuple[bytes, bytes]:
    """Parse the ONNX file and build one serialized plan; returns (plan, updated timing cache)."""
    logger = trt_logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if target.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors)[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if target.precision is Precision.FP16 and not target.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)  # a strongly typed network takes its types from the ONNX
    if settings.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    for profile_shapes_ in shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes_.items():
            try:  # the Python bindings raise (not return False) on a bad shape
                profile.set_shape(name, low, opt, high)
            except (RuntimeError, TypeError) as error:
                raise BuildError(
                    f"TensorRT rejected the profile of '{name}' {low}/{opt}/{high}: {error}"
                ) from None
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache) if timing_cache else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("the timing cache does not fit this TensorRT/GPU; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    try:
        serialized = builder.build_serialized_network(network, config)
    except MemoryError as error:
        logger.errors.append(f"out of memory: {error}")
        serialized = None
    if serialized is None:
        raise build_failure(target.network, logger.errors, profiles, settings.workspace_bytes)
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def parity_points(
    spec: GraphSpec, profiles: Sequence[ShapeProfile], dims: ModelDims
) -> list[tuple[int, dict]]:
    """(profile index, axis sizes) to check: each profile's opt shape, and its min when dynamic."""
    points = []
    for index, profile in enumerate(profiles):
        low, opt, _ = axis_ranges(spec.network, profile, dims)
        points.append((index, opt))
        if low != opt:  # a dynamic profile, or the plain UNet's batch range
            points.append((index, low))
    return points


def parity_gate(
    plan: bytes,
    onnx_path: Path,
    spec: GraphSpec,
    profiles: Sequence[ShapeProfile],
    dims: ModelDims,
    threshold: float,
    seed: int,
    vocab_size: int = 49408,
) -> dict[str, Any]:
    """TensorRT against ONNX Runtime (both run by polygraphy) on fresh random inputs per profile."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from engine.export import compare, summarize_parity

    engine = EngineFromBytes(plan)()
    rng = np.random.default_rng(seed)
    reports = []
    import onnxruntime

    providers = (
        ["cuda", "cpu"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]
    )
    with OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers)) as reference:
        for index, sizes in parity_points(spec, profiles, dims):
            feeds = sample_inputs(spec, sizes, rng, vocab_size)
            expected = reference.infer(feeds)
            with TrtRunner(engine, optimization_profile=index) as runner:
                actual = runner.infer(feeds)
            for name in spec.output_names:
                reports.append(compare(expected[name], np.asarray(actual[name]), sizes))
    return summarize_parity(reports, threshold, seed)


def vocab_size(tokenizer_dir: Path, default: int = 49408) -> int:
    """Token ids the text encoder accepts: random parity inputs must stay below it."""
    try:
        return len(json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))) or default
    except (OSError, ValueError):
        return default


@dataclass(frozen=True)
class PlanResult:
    target: PlanTarget
    path: Path
    built: bool  # False: the cached plan was reused
    reason: str  # why it was built, or "up to date"
    seconds: float
    parity: Mapping[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.parity.get("passed"))


@dataclass
class BuildContext:
    """What every plan of one build shares."""

    trt: Any
    gpu: GpuInfo
    manifest: Manifest
    engine_dir: Path
    plan_dir: Path
    settings: BuildSettings
    timing_cache: bytes
    progress: Callable[[str], None]


def build_one(ctx: BuildContext, target: PlanTarget) -> PlanResult:
    """Reuse the cached plan when its key matches; else build, gate and store it atomically."""
    entry = ctx.manifest.graphs[target.network]
    dims, settings = ctx.manifest.dims, ctx.settings
    key = plan_key(
        target, entry.spec, entry.sha256, settings.profiles, dims, settings, ctx.trt.__version__, ctx.gpu
    )
    plan_path = ctx.plan_dir / f"{target.name}.plan"
    reason = needs_build(plan_path, key, settings.force, settings.no_rebuild)
    if reason is None:
        ctx.progress(f"{target.name}: up to date ({plan_path.name})")
        return PlanResult(target, plan_path, False, "up to date", 0.0, read_sidecar(plan_path)["parity"])
    ctx.progress(f"{target.name}: building ({reason}); profiles {[p.label for p in settings.profiles]}")
    start = time.perf_counter()
    shapes = [dict(p) for p in key.profiles]
    plan, ctx.timing_cache = build_plan(
        ctx.trt, ctx.engine_dir / entry.file, target, shapes, settings.profiles, settings, ctx.timing_cache
    )
    seconds = time.perf_counter() - start
    ctx.progress(f"{target.name}: built in {seconds:.1f} s ({len(plan) / 2**20:.0f} MiB); checking parity")
    seed = settings.parity_seed if settings.parity_seed is not None else secrets.randbits(32)
    threshold = PARITY_THRESHOLDS[target.precision]
    onnx_path = ctx.engine_dir / entry.file
    vocab = vocab_size(ctx.engine_dir / ctx.manifest.tokenizer_dir)
    parity = parity_gate(plan, onnx_path, entry.spec, settings.profiles, dims, threshold, seed, vocab)
    ctx.progress(
        f"{target.name}: parity rel L2 {parity['worst_rel_l2']:.2e} (max {parity['threshold_rel_l2']:.0e}), "
        f"{'passed' if parity['passed'] else 'FAILED: plan discarded'}"
    )
    if parity["passed"]:
        write_atomic(plan_path, plan)
        extra = {"build_seconds": seconds, "profiles": [p.to_json() for p in settings.profiles]}
        write_sidecar(plan_path, key, plan, {**extra, "parity": parity})
    else:
        plan_path.unlink(missing_ok=True)
        sidecar_path(plan_path).unlink(missing_ok=True)
    return PlanResult(target, plan_path, True, reason, seconds, parity)


def record_parity(engine_dir: Path, manifest: Manifest, results: Sequence[PlanResult]) -> Manifest:
    """Store each plan's parity numbers in the manifest, under its graph's ``parity["tensorrt"]``."""
    graphs = dict(manifest.graphs)
    for result in results:
        entry = graphs[result.target.network]
        trt_parity = dict(entry.parity.get("tensorrt", {}))
        trt_parity[result.path.name] = dict(result.parity)
        graphs[result.target.network] = dataclasses.replace(
            entry, parity={**entry.parity, "tensorrt": trt_parity}
        )
    updated = dataclasses.replace(manifest, graphs=graphs)
    write_manifest(engine_dir, updated)
    return updated


def build_engine(
    engine_dir: str | Path,
    settings: BuildSettings = BuildSettings(),
    progress: Callable[[str], None] = log.info,
    device: int = 0,
) -> list[PlanResult]:
    """Build (or reuse) every plan of an engine folder; raise ParityError if one failed its gate.

    Whatever happens, the plans finished so far are indexed and the timing cache is saved.
    """
    root = Path(engine_dir)
    manifest = read_manifest(root)
    targets = plan_targets(manifest, settings)
    if not settings.profiles:
        raise BuildError("no shape profile to build")
    for target in targets:  # profile errors before minutes of building
        for profile in settings.profiles:
            profile_shapes(manifest.graphs[target.network].spec, profile, manifest.dims)
    trt, _, gpu = check_environment(device)
    plan_dir = root / PLAN_DIR
    plan_dir.mkdir(exist_ok=True)
    cache_path = settings.timing_cache or default_timing_cache(plan_dir, trt.__version__, gpu)
    timing = cache_path.read_bytes() if cache_path.is_file() else b""
    ctx = BuildContext(trt, gpu, manifest, root, plan_dir, settings, timing, progress)
    progress(f"TensorRT {trt.__version__} on {gpu.description}; timing cache {cache_path}")
    start = time.perf_counter()
    results: list[PlanResult] = []
    try:
        for target in targets:
            results.append(build_one(ctx, target))
    finally:
        write_atomic(cache_path, ctx.timing_cache)
        finished = {r.target.name: r.passed for r in results}
        complete = {t.network for t in targets} - {t.network for t in targets if t.name not in finished}
        update_index(root, [t for t in targets if t.network in complete], finished)
        record_parity(root, manifest, [r for r in results if r.built])
    built = sum(r.built for r in results)
    progress(f"built {built} of {len(results)} plans in {time.perf_counter() - start:.1f} s")
    failed = [r for r in results if not r.passed]
    if failed:
        worst = failed[0].parity
        raise ParityError(
            f"TensorRT plan(s) {[r.target.name for r in failed]} disagree with ONNX Runtime "
            f"(rel L2 {worst['worst_rel_l2']:.3e} > {worst['threshold_rel_l2']:.0e}, seed {worst['seed']}); "
            "they were discarded"
        )
    return results


def update_index(engine_dir: Path, targets: Sequence[PlanTarget], passed: Mapping[str, bool]) -> None:
    """Rewrite plans.json for the networks just built; other networks keep their entries."""
    try:
        old = read_plan_index(engine_dir)
    except EngineFolderError:
        old = {}
    index = merge_index(old, plan_index(targets, passed), [t.network for t in targets])
    write_atomic(engine_dir / PLAN_DIR / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


# -- command line ------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected WxH such as 512x512, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """Typed settings from the parsed command line (argparse stays out of library code)."""
    profiles = make_profiles(
        ProfileKind(args.profile), args.batch, args.size, args.max_tokens, args.min_size, args.max_size
    )
    if args.workspace <= 0:
        raise BuildError(f"--workspace must be positive, got {args.workspace}")
    return BuildSettings(
        profiles=profiles,
        networks=tuple(Network(n) for n in args.networks) if args.networks else None,
        vae_precision=VaePrecision(args.vae),
        refit=args.refit,
        workspace_bytes=int(args.workspace * GIB),
        optimization_level=args.opt_level,
        timing_cache=args.timing_cache,
        force=args.force,
        no_rebuild=args.no_rebuild,
    )


def cmd_build(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = build_engine(args.engine_dir, settings, progress=say, device=args.device)
    for result in results:
        parity = result.parity
        say(
            f"  {result.target.name:20s} {'built' if result.built else 'cached'} {result.seconds:7.1f} s  "
            f"rel L2 {parity.get('worst_rel_l2', float('nan')):.2e}  {result.path}"
        )
    return 0


def add_build_command(subparsers: Any) -> None:
    """Register ``build`` on the CLI's subparsers; its ``run`` returns the exit code."""
    cmd = subparsers.add_parser(
        "build",
        help="ONNX engine folder -> TensorRT fp16 plans (needs tensorrt and an NVIDIA GPU)",
        description="Build parity-gated TensorRT plans into ENGINE_DIR/tensorrt, reusing cached plans "
        "whose key (ONNX hash, precision, profiles, flags, TensorRT version, GPU) matches.",
    )
    cmd.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR")
    _add_profile_options(cmd)
    cmd.add_argument("--networks", nargs="+", choices=[n.value for n in Network], help="default: all")
    cmd.add_argument(
        "--vae",
        choices=[v.value for v in VaePrecision],
        default="fp32",
        help="fp32 (default) or fp16 with an fp32 fallback on overflow",
    )
    cmd.add_argument("--refit", action="store_true", help="refittable plans (for LoRA weights later)")
    cmd.add_argument("--timing-cache", type=Path, metavar="PATH", help="persistent timing cache file")
    cmd.add_argument(
        "--workspace",
        type=float,
        default=DEFAULT_WORKSPACE_GIB,
        metavar="GIB",
        help=f"builder workspace limit in GiB (default {DEFAULT_WORKSPACE_GIB:g})",
    )
    cmd.add_argument(
        "--opt-level",
        type=int,
        default=DEFAULT_OPT_LEVEL,
        choices=range(6),
        help="TensorRT builder optimization level 0-5 (default 3)",
    )
    cmd.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    cmd.add_argument("--force", action="store_true", help="rebuild even when the cached plan matches")
    cmd.add_argument("--no-rebuild", action="store_true", help="fail instead of rebuilding a stale plan")
    cmd.set_defaults(run=cmd_build)


def _add_profile_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--profile",
        choices=[k.value for k in ProfileKind],
        default="static",
        help="static: min = opt = max per batch and size (fastest); dynamic: one range",
    )
    cmd.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="images per request to cover (default 1); the first is the dynamic opt",
    )
    cmd.add_argument(
        "--size",
        type=parse_size,
        nargs="+",
        default=[(512, 512)],
        metavar="WxH",
        help="image sizes to cover (default 512x512); the first is the dynamic opt",
    )
    cmd.add_argument("--min-size", type=parse_size, metavar="WxH", help="dynamic: smallest image")
    cmd.add_argument("--max-size", type=parse_size, metavar="WxH", help="dynamic: largest image")
    cmd.add_argument("--max-tokens", type=int, default=77, help="longest prompt in tokens, a multiple of 77")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.build_trt ENGINE_DIR ...``: the build command without the full CLI."""
    parser = argparse.ArgumentParser(prog="sd-engine")
    add_build_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except EngineError as error:
        print(f"sd-engine: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
