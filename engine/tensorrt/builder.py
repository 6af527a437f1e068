"""ONNX -> TensorRT plans: shape profiles from the spec tables, fp16, a content-keyed plan cache.

``sd-engine build ENGINE_DIR`` turns every ONNX graph of an engine folder into a serialized TensorRT
plan in ``ENGINE_DIR/tensorrt/``. The text encoders (SDXL: both) and the UNet build in fp16; the VAE
stays fp32 (the SD VAE overflows in fp16) unless ``--vae fp16`` (alias ``fp16-guarded``) also builds an
fp16 plan that the runtime falls back from when its output is not finite. The SDXL VAE overflows far
more often, so its plans are fp32 only. Optimization profiles are computed from the same
:mod:`engine.specs` tables as the export, so a profile cannot name an input the graph lacks; without
profiles a folder gets its family's default (:func:`engine.tensorrt.profiles.default_profiles`: 512 px,
SDXL 1024 px).

Each plan has a sidecar JSON with its :class:`PlanKey`: the ONNX content hash, precision, profile
shapes, builder flags, TensorRT version and GPU. A plan whose sidecar is missing, corrupt or keyed
differently is rebuilt (or, with ``--no-rebuild``, refused), never used. The timing cache persists
between builds. After each build a parity gate (polygraphy runs TensorRT and ONNX Runtime on the same
random inputs) records its numbers in the manifest; a plan that fails it is deleted and not indexed.

Pure parts (profiles, keys, sidecars, error messages) need neither TensorRT nor a GPU; tensorrt and
cuda-python are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BuildError, BuildOutOfMemoryError, EngineFolderError, ParityError
from engine.manifest import Manifest, read_manifest, require_onnx, write_manifest
from engine.specs import (
    GraphSpec,
    ModelDims,
    Network,
    Precision,
    sample_inputs,
)
from engine.tensorrt.env import check_environment, trt_logger
from engine.tensorrt.plans import (
    INDEX_NAME,
    PLAN_DIR,
    GpuInfo,
    PlanTarget,
    Rebuild,
    default_timing_cache,
    merge_index,
    needs_build,
    plan_index,
    plan_key,
    read_plan_index,
    read_sidecar,
    sidecar_path,
    write_atomic,
    write_sidecar,
)
from engine.tensorrt.profiles import ShapeProfile, axis_ranges, default_profiles, profile_shapes

log = logging.getLogger(__name__)


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


# The VAE precisions a build takes: fp32, or fp16 guarded by an fp32 plan to rerun on overflow.
VAE_PRECISIONS = (Precision.FP32, Precision.FP16)


VAE_NETWORKS = (Network.VAE_DECODER, Network.VAE_ENCODER)


# Why SDXL's VAE plans are fp32 only: its decoder's activations pass fp16's 65504 at ordinary sizes
# (diffusers keeps it in fp32 for this: StableDiffusionXLPipeline's force_upcast / upcast_vae).
XL_VAE_NOTE = "fp32 only: the SDXL VAE overflows in fp16"


@dataclass(frozen=True)
class BuildSettings:
    """How plans are built.

    ``profiles`` None: the folder's default, one static batch-1 profile at its family's native size
    (512x512; SDXL 1024x1024), 77 tokens (see :func:`engine.tensorrt.profiles.default_profiles`).
    ``networks`` None: every network of the engine folder, except that a folder with the fused-guidance
    UNet (unet_cfg) gets that plan and not the plain UNet's: sampling with guidance, the usual case, needs
    only one UNet plan. Ask for ``unet`` too to run with guidance off or with guidance_rescale. All of
    :class:`Network` means every network the model has (SD 1.x / 2.x have no text_encoder_2).
    """

    profiles: tuple[ShapeProfile, ...] | None = None
    networks: tuple[Network, ...] | None = None
    vae_precision: Precision = Precision.FP32  # FP16: an fp16 plan guarded by an fp32 one
    refit: bool = False
    workspace_bytes: int = int(DEFAULT_WORKSPACE_GIB * GIB)
    optimization_level: int = DEFAULT_OPT_LEVEL
    timing_cache: Path | None = None  # None: ENGINE_DIR/tensorrt/timing-<trt>-<gpu>.cache
    rebuild: Rebuild = Rebuild.AUTO
    parity_seed: int | None = None


def plan_targets(manifest: Manifest, settings: BuildSettings) -> list[PlanTarget]:
    """The plans to build: fp16 text encoders and UNet; fp32 VAE, plus fp16 when guarded (never for
    SDXL: BuildError). EngineFolderError for a network the folder has no graph of."""
    if settings.vae_precision not in VAE_PRECISIONS:
        valid = ", ".join(p.value for p in VAE_PRECISIONS)
        raise BuildError(
            f"the VAE builds in {valid} (fp16 guarded by fp32), not {settings.vae_precision.value}"
        )
    networks = chosen_networks(manifest, settings.networks)
    if manifest.dims.is_xl and settings.vae_precision is Precision.FP16 and set(networks) & set(VAE_NETWORKS):
        raise BuildError(f"--vae fp16 is not available for SDXL: its VAE plans build in {XL_VAE_NOTE}")
    targets = []
    for network in networks:
        typed = manifest.graphs[network].precision is Precision.FP16
        if network in VAE_NETWORKS:
            if settings.vae_precision is Precision.FP16:
                targets.append(PlanTarget(network, Precision.FP16, typed))
            targets.append(PlanTarget(network, Precision.FP32, typed))
        else:
            targets.append(PlanTarget(network, Precision.FP16, typed))
    return targets


def chosen_networks(manifest: Manifest, networks: tuple[Network, ...] | None) -> tuple[Network, ...]:
    """The networks to build: ``None`` the defaults; all of :class:`Network` those the model has; else
    exactly those named, each of which the folder must hold (EngineFolderError naming the missing)."""
    if networks is None:
        return default_networks(manifest)
    if networks == tuple(Network):
        networks = tuple(n for n in networks if n in manifest.dims.networks)
    missing = [n.value for n in networks if n not in manifest.graphs]
    if missing:
        only_xl = " (only SDXL has text_encoder_2)" if Network.TEXT_ENCODER_2.value in missing else ""
        raise EngineFolderError(f"the engine folder has no ONNX graph for {missing}{only_xl}")
    return networks


def default_networks(manifest: Manifest) -> tuple[Network, ...]:
    """Every network of the folder; the fused-guidance UNet replaces the plain one when present."""
    fused = Network.UNET_CFG in manifest.graphs
    return tuple(n for n in manifest.graphs if not (fused and n is Network.UNET))


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

    from engine.export import compare
    from engine.parity import summarize_parity

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


def precision_note(dims: ModelDims, target: PlanTarget) -> str:
    """What the build log adds about a plan's precision: why an SDXL VAE plan is fp32."""
    return f"; {XL_VAE_NOTE}" if dims.is_xl and target.network in VAE_NETWORKS else ""


def tokenizer_dir(manifest: Manifest, network: Network) -> str:
    """The tokenizer folder of a network's text encoder (SDXL's second: tokenizer_2); the first for the
    others, whose random parity inputs have no token ids."""
    dirs = manifest.tokenizer_dirs
    return dirs[-1] if network is Network.TEXT_ENCODER_2 else dirs[0]


def vocab_size(tokenizer_dir: Path) -> int:
    """Token ids the text encoder accepts (the engine's tokenizer, either layout): random parity
    inputs must stay below it."""
    from engine.text.tokenizer import ClipTokenizer

    return ClipTokenizer.from_folder(tokenizer_dir).vocab_size


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
    reason = needs_build(plan_path, key, settings.rebuild)
    if reason is None:
        ctx.progress(f"{target.name}: up to date ({plan_path.name})")
        return PlanResult(target, plan_path, False, "up to date", 0.0, read_sidecar(plan_path)["parity"])
    note = precision_note(dims, target)
    labels = [p.label for p in settings.profiles]
    ctx.progress(f"{target.name}: building ({reason}); profiles {labels}{note}")
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
    vocab = vocab_size(ctx.engine_dir / tokenizer_dir(ctx.manifest, target.network))
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
    """Build (or reuse) every plan of an engine folder; raise ParityError if one failed its gate, a
    one-line EngineFolderError for a folder exported ``--torch-only`` (no ONNX to build from).

    Whatever happens, the plans finished so far are indexed and the timing cache is saved.
    """
    root = Path(engine_dir)
    manifest = read_manifest(root)
    require_onnx(root, manifest, "`sd-engine build` (TensorRT builds from the ONNX graphs)")
    targets = plan_targets(manifest, settings)
    if settings.profiles is None:
        settings = dataclasses.replace(settings, profiles=default_profiles(manifest.model_family))
    if not settings.profiles:
        raise BuildError("no shape profile to build")
    for target in targets:  # profile errors before minutes of building
        for profile in settings.profiles:
            profile_shapes(manifest.graphs[target.network].spec, profile, manifest.dims)
    trt, _, gpu = check_environment(device, for_build=True)
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
