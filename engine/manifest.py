"""manifest.json: what an engine folder holds and how it was made.

Written last by export (inside its temporary folder), read first by the runtime, which refuses a
folder whose format version it does not know.

A folder exported with ``--torch-only`` has the same manifest with no ONNX files: every graph's
``file`` and ``sha256`` are null and its parity is empty. The torch backends need only the specs and
the source model the manifest names; whatever reads ONNX files calls :func:`require_onnx` first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineFolderError
from engine.fsutil import write_atomic
from engine.specs import GraphSpec, ModelDims, Network, Precision

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"  # SDXL's second tokenizer (pads with "!")
XL_DIMS = ("text_hidden_size_2", "text_num_layers_2", "pooled_size", "time_ids_size")


@dataclass(frozen=True)
class WeightRef:
    """Where an exported graph holds one torch weight (a Linear / Conv2d ``weight``), for LoRA patching.

    initializer: the ONNX initializer's name; transposed: stored as the torch weight's transpose (MatMul
    weights of Linear layers); file, offset: the file (relative to the engine folder) and byte offset of
    its raw little-endian data; dtype: the stored dtype ("float32" / "float16"); shape: the torch layout,
    (out, in) or (out, in, kh, kw).
    """

    initializer: str
    transposed: bool
    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transposed else tuple(self.shape)

    def to_json(self) -> list[Any]:
        return [self.initializer, self.transposed, self.file, self.offset, self.dtype, list(self.shape)]

    @staticmethod
    def from_json(data: list[Any]) -> WeightRef:
        initializer, transposed, file, offset, dtype, shape = data
        return WeightRef(str(initializer), bool(transposed), str(file), int(offset), str(dtype), tuple(shape))


def weights_to_json(weights: Mapping[str, WeightRef]) -> dict[str, list[Any]]:
    return {target: ref.to_json() for target, ref in weights.items()}


def weights_from_json(data: Mapping[str, Any] | None) -> dict[str, WeightRef]:
    return {str(target): WeightRef.from_json(ref) for target, ref in (data or {}).items()}


@dataclass(frozen=True)
class Variant:
    """A rewrite of a graph for one runtime (same interface, same weights file), parity-gated itself."""

    file: str
    sha256: str
    rewrite: str  # what changed, e.g. "32 attentions -> com.microsoft.MultiHeadAttention"
    parity: Mapping[str, Any] = field(default_factory=dict)
    weights: Mapping[str, WeightRef] = field(default_factory=dict)  # LoRA targets, see GraphEntry

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "rewrite": self.rewrite,
            "parity": dict(self.parity),
            "weights": weights_to_json(self.weights),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Variant:
        return Variant(
            str(data["file"]),
            str(data["sha256"]),
            str(data["rewrite"]),
            dict(data.get("parity", {})),
            weights_from_json(data.get("weights")),
        )


@dataclass(frozen=True)
class GraphEntry:
    """One exported network: its files, interface, precision and parity numbers.

    file, sha256: the ONNX graph and its content hash; both None in a ``--torch-only`` export (no
    ONNX: see :attr:`has_onnx`), which then has no external data, variant or parity either.
    onnxruntime: the graph ONNX Runtime runs instead of ``file`` when present (attention fused into
    its contrib op, which TensorRT cannot parse: TensorRT builds from ``file``).
    weights: LoRA targets ("unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ...) ->
    where ``file`` holds them (see :class:`WeightRef`); empty for networks LoRA does not touch and for
    folders exported before LoRA support.
    """

    file: str | None
    sha256: str | None
    spec: GraphSpec
    precision: Precision
    external_data: str | None = None
    parity: Mapping[str, Any] = field(default_factory=dict)
    exporter: Mapping[str, str] = field(default_factory=dict)
    onnxruntime: Variant | None = None
    weights: Mapping[str, WeightRef] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.file is None and (self.sha256 or self.external_data or self.onnxruntime):
            raise ValueError(
                f"{self.spec.network.value}: a graph without an ONNX file has no hash or variant"
            )
        if self.file is not None and self.sha256 is None:
            raise ValueError(f"{self.spec.network.value}: an ONNX file needs its sha256")

    @property
    def has_onnx(self) -> bool:
        """Whether the folder holds this network as an ONNX graph (False: exported ``--torch-only``)."""
        return self.file is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "external_data": self.external_data,
            "precision": self.precision.value,
            "spec": self.spec.to_json(),
            "parity": dict(self.parity),
            "exporter": dict(self.exporter),
            "onnxruntime": self.onnxruntime.to_json() if self.onnxruntime else None,
            "weights": weights_to_json(self.weights),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> GraphEntry:
        return GraphEntry(
            file=_optional_str(data["file"]),
            sha256=_optional_str(data["sha256"]),
            spec=GraphSpec.from_json(data["spec"]),
            precision=Precision(data["precision"]),
            external_data=data.get("external_data"),
            parity=dict(data.get("parity", {})),
            exporter=dict(data.get("exporter", {})),
            onnxruntime=Variant.from_json(data["onnxruntime"]) if data.get("onnxruntime") else None,
            weights=weights_from_json(data.get("weights")),
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an engine folder besides the graphs' bytes."""

    model_family: str
    prediction_type: str
    dims: ModelDims
    scaling_factor: float
    scheduler_config: Mapping[str, Any]
    graphs: Mapping[Network, GraphEntry]
    source: Mapping[str, Any] = field(default_factory=dict)
    tokenizer_dir: str = TOKENIZER_DIR
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_family": self.model_family,
            "prediction_type": self.prediction_type,
            "latent_channels": self.dims.latent_channels,
            "text_hidden_size": self.dims.text_hidden_size,
            "text_max_length": self.dims.text_max_length,
            "vae_scale_factor": self.dims.vae_scale_factor,
            "text_num_layers": self.dims.text_num_layers,
            **{name: getattr(self.dims, name) for name in XL_DIMS if self.dims.is_xl},
            "scaling_factor": self.scaling_factor,
            "scheduler_config": dict(self.scheduler_config),
            "tokenizer_dir": self.tokenizer_dir,
            "source": dict(self.source),
            "graphs": {network.value: entry.to_json() for network, entry in self.graphs.items()},
        }

    @property
    def tokenizer_dirs(self) -> tuple[str, ...]:
        """The tokenizer folders, one per text encoder (SDXL: ``tokenizer`` and ``tokenizer_2``)."""
        return (self.tokenizer_dir, TOKENIZER_2_DIR) if self.dims.is_xl else (self.tokenizer_dir,)

    @property
    def torch_only(self) -> bool:
        """Whether the folder was exported ``--torch-only``: a graph without an ONNX file."""
        return any(not entry.has_onnx for entry in self.graphs.values())

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Manifest:
        dims = ModelDims(
            latent_channels=int(data["latent_channels"]),
            text_hidden_size=int(data["text_hidden_size"]),
            text_max_length=int(data["text_max_length"]),
            vae_scale_factor=int(data["vae_scale_factor"]),
            text_num_layers=int(data.get("text_num_layers", ModelDims.text_num_layers)),
            **{name: int(data.get(name, 0)) for name in XL_DIMS},
        )
        return Manifest(
            model_family=str(data["model_family"]),
            prediction_type=str(data["prediction_type"]),
            dims=dims,
            scaling_factor=float(data["scaling_factor"]),
            scheduler_config=dict(data["scheduler_config"]),
            graphs={Network(k): GraphEntry.from_json(v) for k, v in data["graphs"].items()},
            source=dict(data.get("source", {})),
            tokenizer_dir=str(data.get("tokenizer_dir", TOKENIZER_DIR)),
            format_version=int(data["format_version"]),
        )


def write_manifest(engine_dir: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (see :func:`engine.fsutil.write_atomic`)."""
    return write_atomic(engine_dir / MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2) + "\n")


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Load and check an engine folder's manifest; one-line EngineFolderError on any problem."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise EngineFolderError(f"engine folder not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EngineFolderError(
            f"not an engine folder (no {MANIFEST_NAME}): {root}; create one with `sd-engine export`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineFolderError(f"corrupt {path}: {error}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise EngineFolderError(
            f"{path} has format version {version}, this sd-engine reads version {FORMAT_VERSION}; "
            "re-export the model with this version"
        )
    try:
        manifest = Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as error:
        raise EngineFolderError(f"corrupt {path}: bad or missing field {error}") from None
    for entry in manifest.graphs.values():
        files = [entry.file] if entry.file is not None else []
        files += [entry.onnxruntime.file] if entry.onnxruntime else []
        for file in files:
            if not (root / file).is_file():
                raise EngineFolderError(f"engine folder {root} is missing {file}")
    return manifest


def require_onnx(engine_dir: str | Path, manifest: Manifest, user: str) -> None:
    """One-line EngineFolderError when the folder has no ONNX graphs (exported ``--torch-only``).

    user: what needs them, for the message, e.g. "the onnxruntime backend" or "`sd-engine build`".
    Called by everything that reads ``GraphEntry.file`` before it reads one.
    """
    if manifest.torch_only:
        raise EngineFolderError(
            f"{user} cannot use engine folder {Path(engine_dir)}: it was exported with --torch-only "
            "(no ONNX graphs) and runs only with --backend torch or torch-cuda; export again without "
            "--torch-only for onnxruntime / openvino / tensorrt"
        )
