"""Export a diffusers SD folder to an engine folder: ONNX graphs, tokenizer, manifest.

One ``convert_network`` per network through the thin wrappers of :mod:`engine.models.torch_modules`, each
ending in a parity gate (ONNX Runtime vs torch on fresh random inputs at two shapes) that raises
with the numbers. Everything is written into a temporary folder that is renamed into place only
when every graph passed, so an interrupted export never leaves a folder that looks complete.

``ExportSettings(torch_only=True)`` writes only the manifest (every network's spec, no ONNX file) and
the tokenizer, in seconds: the folder runs on the torch backends, which load the source model the
manifest names, and nothing that needs ONNX graphs (see :func:`engine.manifest.require_onnx`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError, ModelFolderError, ParityError
from engine.fsutil import staged_folder
from engine.hashing import graph_content_hash
from engine.machine import release_freed_memory
from engine.manifest import GraphEntry, Manifest, Variant, write_manifest
from engine.models.source import ModelSource, SourceOptions, open_model_source
from engine.onnx.attention_fusion import write_fused
from engine.onnx.cfg_graph import derive_cfg_graph
from engine.onnx.weight_map import lora_weights, weight_map
from engine.parity import compare, summarize_parity
from engine.specs import (
    GraphSpec,
    ModelDims,
    Network,
    Precision,
    axis_sizes,
    graph_specs,
    sample_inputs,
)

log = logging.getLogger(__name__)


OPSET = 18


EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's limit: bigger graphs keep weights in one side file


# Relative L2 error a graph may have against torch, by precision.
PARITY_THRESHOLDS = {Precision.FP32: 1e-4, Precision.FP16: 2e-2}


# (batch, latent height, latent width, text sequence) to trace at: no axis of size 1 anywhere in
# the UNet, since the tracer would specialize it.
TRACE_SHAPE = (2, 24, 16, 77)


# Graphs that get an ONNX Runtime variant with attention fused (their weights live in a shared file).
ATTENTION_FUSED = (Network.UNET, Network.UNET_CFG)


# Graphs a LoRA patches: their Linear / Conv2d weights are mapped to initializers in the manifest.
LORA_NETWORKS = (Network.TEXT_ENCODER, Network.TEXT_ENCODER_2, Network.UNET, Network.UNET_CFG)


# Parity shapes: the second has latent sides that are not multiples of 8 and a 2-chunk text.
PARITY_SHAPES = ((2, 8, 8, 77), (1, 9, 7, 154))


@dataclass(frozen=True)
class ExportSettings:
    """What to export and how.

    torch_only: write no ONNX (manifest and tokenizer only, no parity gate): the folder runs only on
    the torch and torch-cuda backends, which choose their own precision (so fp16 is refused with it).
    """

    precision: Precision = Precision.FP32
    networks: tuple[Network, ...] = tuple(Network)
    overwrite: bool = False
    # fp16 graphs keep the VAE in fp32: the SD VAE overflows in fp16.
    fp32_networks: tuple[Network, ...] = (Network.VAE_DECODER, Network.VAE_ENCODER)
    parity_threshold: float | None = None
    torch_only: bool = False

    def __post_init__(self) -> None:
        ordered = tuple(n for n in Network if n in self.networks)  # unet before the unet_cfg derived from it
        object.__setattr__(self, "networks", ordered)
        if Network.UNET_CFG in ordered and Network.UNET not in ordered:
            raise EngineError("the unet_cfg graph is derived from the unet graph: export unet with it")
        if self.torch_only and self.precision is not Precision.FP32:
            raise EngineError(
                "--fp16 has no effect with --torch-only (no ONNX graphs): the torch-cuda backend runs "
                "fp16 by its precision option"
            )

    def precision_of(self, network: Network) -> Precision:
        return Precision.FP32 if network in self.fp32_networks else self.precision

    def threshold(self, precision: Precision) -> float:
        return self.parity_threshold if self.parity_threshold is not None else PARITY_THRESHOLDS[precision]


@dataclass(frozen=True)
class ExportResult:
    engine_dir: Path
    manifest: Manifest
    seconds: Mapping[str, float] = field(default_factory=dict)


def model_dims(source: ModelSource) -> ModelDims:
    unet, vae, text = source.configs["unet"], source.configs["vae"], source.configs["text_encoder"]
    dims = ModelDims(
        latent_channels=int(unet.get("in_channels", 4)),
        text_hidden_size=int(text["hidden_size"]),
        text_max_length=int(text.get("max_position_embeddings", 77)),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1),
        text_num_layers=int(text["num_hidden_layers"]),
    )
    text_2 = source.configs.get("text_encoder_2")
    return dims if text_2 is None else xl_dims(dims, unet, text_2)


def xl_dims(dims: ModelDims, unet: Mapping[str, Any], text_2: Mapping[str, Any]) -> ModelDims:
    """SDXL's sizes: the second encoder's width, layers and projection, and the number of time ids
    ((projection_class_embeddings_input_dim - pooled) / addition_time_embed_dim: 6 for the base model,
    5 for the refiner's aesthetic score). ModelFolderError when the UNet is not "text_time" conditioned
    to fit them."""
    pooled = int(text_2.get("projection_dim", text_2["hidden_size"]))
    per_id = int(unet.get("addition_time_embed_dim") or 0)
    total = int(unet.get("projection_class_embeddings_input_dim") or 0)
    if unet.get("addition_embed_type") != "text_time" or per_id <= 0 or (total - pooled) % per_id:
        raise ModelFolderError(
            "unet: an SDXL model needs addition_embed_type 'text_time' with "
            f"projection_class_embeddings_input_dim = time ids x addition_time_embed_dim + {pooled} "
            "(the pooled width); the config has "
            f"{unet.get('addition_embed_type')!r}, {total}, {per_id}"
        )
    return dataclasses.replace(
        dims,
        text_hidden_size_2=int(text_2["hidden_size"]),
        text_num_layers_2=int(text_2["num_hidden_layers"]),
        pooled_size=pooled,
        time_ids_size=(total - pooled) // per_id,
    )


def selected_networks(settings: ExportSettings, dims: ModelDims) -> tuple[Network, ...]:
    """The settings' networks the model has (text_encoder_2 only for SDXL); EngineError when a network
    was asked for by name that the model lacks."""
    chosen = tuple(n for n in settings.networks if n in dims.networks)
    if settings.networks != tuple(Network) and len(chosen) < len(settings.networks):
        missing = [n.value for n in settings.networks if n not in chosen]
        raise EngineError(f"the model has no {', '.join(missing)} network (only SDXL has text_encoder_2)")
    return chosen


def export_model(
    model: str | Path,
    engine_dir: str | Path,
    settings: ExportSettings = ExportSettings(),
    progress: Callable[[str], None] = log.info,
    options: SourceOptions | None = None,
) -> ExportResult:
    """Validate, convert every network, gate each on parity, then move the folder into place.

    model: a diffusers folder or a single-file checkpoint (see :mod:`engine.models.source`); options:
    its VAE swap, EMA weights, prediction type, architecture config.
    """
    source = open_model_source(model, options or SourceOptions())
    target = Path(engine_dir).absolute()
    export = _export_torch_only if settings.torch_only else _export_into
    with staged_folder(target, settings.overwrite) as tmp:
        report_source(source, progress)
        manifest, seconds = export(source, tmp, settings, progress)
    return ExportResult(target, manifest, seconds)


def report_source(source: ModelSource, progress: Callable[[str], None]) -> None:
    """Warn once per scheduler migration; say what was read and decided (family, prediction type
    and how it was chosen, A1111 hash)."""
    for line in source.migrations:
        log.warning("%s", line)
    for note in source.notes:
        progress(note)
    progress(
        f"{source.kind.value} {source.identity.name}: {source.family}, {source.prediction_type} "
        f"({source.prediction_source}), hash {source.identity.short}"
    )


# The source component each network runs: export loads one component at a time and frees it before the
# next, so an SDXL export never holds the whole model (its fp32 UNet alone is 10.3 GB).
COMPONENT_OF = {
    Network.TEXT_ENCODER: "text_encoder",
    Network.TEXT_ENCODER_2: "text_encoder_2",
    Network.UNET: "unet",
    Network.UNET_CFG: "unet",
    Network.VAE_DECODER: "vae",
    Network.VAE_ENCODER: "vae",
}


@dataclass(frozen=True)
class ParityCase:
    """One parity input: the axis sizes, the random feeds and torch's outputs for them."""

    sizes: Mapping[str, int]
    feeds: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class PendingGraph:
    """A graph written (with its variant and weight map) and its torch references taken, waiting for
    its ONNX Runtime gate, which runs once the torch network is freed."""

    entry: GraphEntry
    cases: tuple[ParityCase, ...]
    seed: int


def _export_into(
    model: ModelSource, out: Path, settings: ExportSettings, progress: Callable[[str], None]
) -> tuple[Manifest, dict[str, float]]:
    """Per source component: load it, write and reference each of its graphs, free it, then gate the
    graphs on ONNX Runtime, so torch's and ONNX Runtime's copies of big weights never coexist."""
    dims = model_dims(model)
    write_tokenizers(model, out)
    networks = selected_networks(settings, dims)
    graphs: dict[Network, GraphEntry] = {}
    seconds: dict[str, float] = {}
    for component in dict.fromkeys(COMPONENT_OF[n] for n in networks):
        start = time.perf_counter()
        source = model.load(only=(component,))
        seconds[f"load {component}"] = time.perf_counter() - start
        group = [n for n in networks if COMPONENT_OF[n] == component]
        pending = {}
        for network in group:
            progress(f"exporting {network.value}")
            start = time.perf_counter()
            pending[network] = write_network(
                network, source.wrapper(network), out, settings, dims, model, graphs
            )
            graphs[network] = pending[network].entry  # unet_cfg derives from the unet's file
            seconds[network.value] = time.perf_counter() - start
        del source
        release_memory()
        for network in group:
            start = time.perf_counter()
            graphs[network] = gate_pending(pending.pop(network), out, settings)
            seconds[network.value] += time.perf_counter() - start
            parity = graphs[network].parity
            progress(
                f"  {network.value}: {seconds[network.value]:.1f} s, rel L2 {parity['worst_rel_l2']:.2e}"
            )
    manifest = build_manifest(model, dims, graphs)
    write_manifest(out, manifest)
    return manifest, seconds


def release_memory() -> None:
    """Free what the last torch network held: Python's cycles, then the C heap's free pages."""
    import gc

    gc.collect()
    release_freed_memory()


def write_network(
    network: Network,
    module: Any,
    out: Path,
    settings: ExportSettings,
    dims: ModelDims,
    model: ModelSource,
    graphs: Mapping[Network, GraphEntry],
) -> PendingGraph:
    """The network's ONNX file (the unet_cfg graph rewritten from the unet's), its ONNX Runtime variant
    and LoRA weight map, and torch's outputs on fresh random parity inputs; nothing run on ONNX Runtime."""
    spec = graph_specs(dims)[network]
    if network is Network.UNET_CFG:
        unet = graphs[Network.UNET]
        derive_cfg_graph(out / unet.file, out / f"{network.value}.onnx", unet.spec, spec)
        external = unet.external_data
    else:
        precision = settings.precision_of(network)
        graph_module = fp16_boundary(module) if precision is Precision.FP16 else module
        external = export_onnx(graph_module, spec, out / f"{network.value}.onnx", dims, vocab_size_of(model))
        del graph_module
        name_dynamic_axes(out / f"{network.value}.onnx", spec)
    entry = ungated_entry(spec, out, external, settings)
    if network in ATTENTION_FUSED:
        entry = with_fused_attention(entry, out)
    if network in LORA_NETWORKS:
        entry = with_weight_map(entry, module, out)
    seed = secrets.randbits(32)
    return PendingGraph(entry, reference_cases(module, spec, dims, vocab_size_of(model), seed), seed)


def vocab_size_of(model: ModelSource) -> int:
    return int(model.configs["text_encoder"].get("vocab_size", 49408))


def gate_pending(pending: PendingGraph, out: Path, settings: ExportSettings) -> GraphEntry:
    """The entry with its parity numbers (and its variant's), once each graph matched torch's outputs;
    ParityError otherwise. One ONNX Runtime session at a time."""
    entry = pending.entry
    threshold = settings.threshold(entry.precision)
    parity = check_cases(entry.spec, out / entry.file, pending.cases, threshold, pending.seed)
    variant = entry.onnxruntime
    if variant is not None:
        variant_parity = check_cases(entry.spec, out / variant.file, pending.cases, threshold, pending.seed)
        variant = dataclasses.replace(variant, parity=variant_parity)
    return dataclasses.replace(entry, parity=parity, onnxruntime=variant)


def _export_torch_only(
    model: ModelSource, out: Path, settings: ExportSettings, progress: Callable[[str], None]
) -> tuple[Manifest, dict[str, float]]:
    """Manifest and tokenizer only: each network's spec with no ONNX file (nothing traced or loaded;
    :func:`engine.models.source.open_model_source` already checked the weights against the configs)."""
    start = time.perf_counter()
    progress(
        "--torch-only: writing no ONNX graphs, only the manifest and tokenizer (runs on --backend "
        "torch / torch-cuda)"
    )
    dims = model_dims(model)
    specs = graph_specs(dims)
    write_tokenizers(model, out)
    versions = torch_only_versions()
    graphs = {
        network: GraphEntry(
            file=None,
            sha256=None,
            spec=specs[network],
            precision=settings.precision_of(network),
            exporter=versions,
        )
        for network in selected_networks(settings, dims)
    }
    manifest = build_manifest(model, dims, graphs)
    write_manifest(out, manifest)
    return manifest, {"manifest": time.perf_counter() - start}


def write_tokenizers(model: ModelSource, out: Path) -> None:
    """Each text encoder's tokenizer folder (SDXL: tokenizer/ and tokenizer_2/) into the engine folder."""
    for component in model.tokenizers:
        model.write_tokenizer(out / component, component)


def build_manifest(model: ModelSource, dims: ModelDims, graphs: dict[Network, GraphEntry]) -> Manifest:
    return Manifest(
        model_family=model.family,
        prediction_type=model.prediction_type,
        dims=dims,
        scaling_factor=float(model.configs["vae"].get("scaling_factor", 0.18215)),
        scheduler_config=dict(model.configs["scheduler"]),
        graphs=graphs,
        source=model.manifest_source(),
    )


def with_fused_attention(entry: GraphEntry, out: Path) -> GraphEntry:
    """The entry plus its ONNX Runtime variant (attention fused, not yet gated), when the graph has
    attention to fuse."""
    path = out / entry.file
    target = path.with_name(f"{path.stem}.ort.onnx")
    count = write_fused(path, target)
    if not count:
        return entry
    variant = Variant(
        file=target.name,
        sha256=graph_content_hash(target),
        rewrite=f"{count} attentions -> com.microsoft.MultiHeadAttention",
    )
    return dataclasses.replace(entry, onnxruntime=variant)


def with_weight_map(entry: GraphEntry, module: Any, out: Path) -> GraphEntry:
    """The entry with its LoRA weight map (and its ONNX Runtime variant's), see :mod:`engine.onnx.weight_map`.

    Warns when some Linear / Conv2d weights could not be located: LoRAs touching them are refused.
    """
    weights = lora_weights(module)
    mapped = weight_map(out / entry.file, weights)
    variant = entry.onnxruntime
    if variant is not None:
        variant = dataclasses.replace(variant, weights=weight_map(out / variant.file, weights))
    missing = len(weights) - len(mapped)
    if missing:
        log.warning(
            "%s: %d of %d weights have no unique initializer; LoRAs cannot patch them",
            entry.spec.network.value,
            missing,
            len(weights),
        )
    return dataclasses.replace(entry, weights=mapped, onnxruntime=variant)


def ungated_entry(spec: GraphSpec, out: Path, external: str | None, settings: ExportSettings) -> GraphEntry:
    """The manifest entry of ``out/<network>.onnx``, its parity still to be measured (see gate_pending)."""
    path = out / f"{spec.network.value}.onnx"
    return GraphEntry(
        file=path.name,
        sha256=graph_content_hash(path),
        spec=spec,
        precision=settings.precision_of(spec.network),
        external_data=external,
        exporter=tool_versions(),
    )


def export_onnx(module: Any, spec: GraphSpec, path: Path, dims: ModelDims, vocab_size: int) -> str | None:
    """Dynamo export (opset 18) with every symbolic axis dynamic; returns the external data file name."""
    import torch

    batch, height, width, sequence = TRACE_SHAPE
    sizes = axis_sizes(batch, height, width, dims.vae_scale_factor, sequence)
    feeds = sample_inputs(spec, sizes, np.random.default_rng(0), vocab_size)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    auto = torch.export.Dim.AUTO
    dynamic_shapes: list[Any] = [
        {axis: auto for axis, dim in enumerate(t.dims) if isinstance(dim, str)} for t in spec.inputs
    ]
    if takes_varargs(module):
        dynamic_shapes = [tuple(dynamic_shapes)]
    external = parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes,
            external_data=external,
            verbose=False,
        )
    return f"{path.name}.data" if external else None


def takes_varargs(module: Any) -> bool:
    parameters = inspect.signature(module.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def parameter_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def name_dynamic_axes(path: Path, spec: GraphSpec) -> None:
    """Rename the exporter's symbolic dims (s17, s53, ...) to the spec's axis names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    renames: dict[str, str] = {}
    for value, tensor in zip(
        list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs, strict=True
    ):
        for dim_proto, dim in zip(value.type.tensor_type.shape.dim, tensor.dims, strict=True):
            if isinstance(dim, str) and dim_proto.dim_param:
                renames.setdefault(dim_proto.dim_param, dim)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim_proto in value.type.tensor_type.shape.dim:
            if dim_proto.dim_param in renames:
                dim_proto.dim_param = renames[dim_proto.dim_param]
    onnx.save(model, str(path))


def fp16_boundary(module: Any) -> Any:
    """A half-precision copy of the module whose graph still takes and returns float32."""
    import copy

    import torch

    class Fp16Boundary(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = copy.deepcopy(inner).half()

        def forward(self, *args: torch.Tensor) -> Any:
            halves = [a.half() if a.is_floating_point() else a for a in args]
            out = self.inner(*halves)
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    return Fp16Boundary(module).eval()


def parity_gate(
    module: Any, spec: GraphSpec, path: Path, dims: ModelDims, vocab_size: int, threshold: float
) -> dict[str, Any]:
    """Run torch and ONNX Runtime on fresh random inputs at two shapes; raise if they disagree."""
    seed = secrets.randbits(32)
    return check_cases(spec, path, reference_cases(module, spec, dims, vocab_size, seed), threshold, seed)


def reference_cases(
    module: Any, spec: GraphSpec, dims: ModelDims, vocab_size: int, seed: int
) -> tuple[ParityCase, ...]:
    """torch's outputs on random inputs (drawn from ``seed``) at each of PARITY_SHAPES."""
    rng = np.random.default_rng(seed)
    cases = []
    for batch, height, width, sequence in PARITY_SHAPES:
        sizes = axis_sizes(batch, height, width, dims.vae_scale_factor, sequence)
        feeds = sample_inputs(spec, sizes, rng, vocab_size)
        cases.append(ParityCase(sizes, feeds, run_torch(module, spec, feeds)))
    return tuple(cases)


def check_cases(
    spec: GraphSpec, path: Path, cases: Sequence[ParityCase], threshold: float, seed: int
) -> dict[str, Any]:
    """The graph at ``path`` on ONNX Runtime against torch's outputs: the parity summary, or ParityError
    with the worst numbers when the relative L2 error exceeds ``threshold``."""
    from engine.backends.onnxruntime import OnnxRuntimeBackend

    graph = OnnxRuntimeBackend().load(path, spec)
    reports = []
    for case in cases:
        actual = graph.run(dict(case.feeds))
        reports.extend(compare(case.expected[name], actual[name], case.sizes) for name in spec.output_names)
    del graph
    result = summarize_parity(reports, threshold, seed)
    worst = max(reports, key=lambda r: r.rel_l2)
    if not result["passed"]:
        raise ParityError(
            f"{spec.network.value}: ONNX Runtime disagrees with torch: rel L2 {worst.rel_l2:.3e} > "
            f"{threshold:.1e} (max abs {worst.max_abs:.3e}, sizes {dict(worst.sizes)}, seed {seed})"
        )
    return result


def run_torch(module: Any, spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    outputs = out if isinstance(out, tuple) else (out,)
    return {name: o.float().numpy() for name, o in zip(spec.output_names, outputs, strict=True)}


def torch_only_versions() -> dict[str, str]:
    """What a ``--torch-only`` export records as its exporter: no ONNX tools, no imports."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"exporter": "none (--torch-only: no ONNX)"}
    for package in ("torch", "diffusers", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def tool_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": str(OPSET),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
