"""Local diffusers Stable Diffusion 1.x / 2.x / XL folders: validation with one-line errors, then loading.

Validation reads only JSON and safetensors headers, so a missing, truncated or mismatched file is
reported before torch spends a minute building modules.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError, ModelFolderError

SD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SUPPORTED_PIPELINES = SD_PIPELINES + XL_PIPELINES
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder and its tokenizer
NETWORK_COMPONENTS = ("unet", "vae", "text_encoder")
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # each with its tokenizer
CONFIG_NAMES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "scheduler": "scheduler_config.json",
}
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
TOKENIZER_JSON = "tokenizer.json"  # what transformers 5 saves
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # what older folders (SD 1.5, SD 2.1) ship


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    variant: str | None  # "fp16" for *.fp16.safetensors files
    safetensors: bool


@dataclass(frozen=True)
class ModelFolder:
    """A validated diffusers folder: where each part lives and what its configs say."""

    root: Path
    pipeline_class: str
    weights: dict[str, WeightsFile]
    configs: dict[str, dict[str, Any]]
    index: dict[str, Any] = field(default_factory=dict)  # model_index.json

    @property
    def variant(self) -> str | None:
        variants = {w.variant for w in self.weights.values()}
        return variants.pop() if len(variants) == 1 else None

    @property
    def family(self) -> str:
        """'sdxl' with a second text encoder; else 'sd1' or 'sd2', from the text encoder width (768: CLIP
        ViT-L, 1024: OpenCLIP ViT-H)."""
        return model_family(self.configs)


def model_family(configs: dict[str, Any]) -> str:
    """'sdxl' when the configs hold a second text encoder; else 'sd2' for a 1024-wide text encoder
    (OpenCLIP ViT-H), 'sd1' otherwise (CLIP ViT-L)."""
    if "text_encoder_2" in configs:
        return "sdxl"
    return "sd2" if configs["text_encoder"].get("hidden_size") == 1024 else "sd1"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from disk, or a ModelFolderError naming the file."""
    if not path.is_file():
        raise ModelFolderError(f"{what}: missing {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{what}: cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{what}: {path} is not a JSON object")
    return data


def inspect_model_folder(path: str | Path) -> ModelFolder:
    """Validate a diffusers SD folder; raise ModelFolderError with one line naming what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFolderError(f"model folder not found: {root}")
    index = read_json(root / "model_index.json", "not a diffusers model folder")
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise ModelFolderError(
            f"unsupported pipeline class '{pipeline_class}' in {root / 'model_index.json'}; "
            f"supported: {', '.join(SUPPORTED_PIPELINES)} (Stable Diffusion 1.x / 2.x / XL)"
        )
    xl = pipeline_class in XL_PIPELINES
    for component in COMPONENTS + (XL_COMPONENTS if xl else ()):
        if not (root / component).is_dir():
            raise ModelFolderError(f"model folder {root} is missing the {component}/ subfolder")
    encoders = [name for name in TEXT_ENCODERS if xl or name == "text_encoder"]
    names = [name for name in CONFIG_NAMES if name in encoders or not name.startswith("text_encoder")]
    configs = {name: read_json(root / name / CONFIG_NAMES[name], f"{name} config") for name in names}
    for encoder in encoders:
        check_tokenizer(root / TEXT_ENCODERS[encoder], configs[encoder], encoder)
    components = NETWORK_COMPONENTS + (("text_encoder_2",) if xl else ())
    weights = {name: find_weights(root / name, WEIGHT_STEMS[name]) for name in components}
    for file in weights.values():
        if file.safetensors:
            check_safetensors(file.path)
    return ModelFolder(root, pipeline_class, weights, configs, index)


def check_tokenizer(folder: Path, text_encoder_config: dict[str, Any], encoder: str = "text_encoder") -> None:
    """The tokenizer folder loads as the runtime will load it, and its ids fit the text encoder.

    Either layout: tokenizer.json (transformers 5) or vocab.json + merges.txt (older folders); see
    :meth:`engine.text.tokenizer.ClipTokenizer.from_folder`, whose one-line errors are re-raised as
    ModelFolderError. Token ids at or beyond the text encoder's ``vocab_size`` (config.json) would
    index past its embedding table: refused here, not at generation.
    """
    from engine.text.tokenizer import ClipTokenizer

    what = folder.name
    if not (folder / TOKENIZER_JSON).is_file():
        missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
        if missing:
            raise ModelFolderError(
                f"{what}: {folder} has neither {TOKENIZER_JSON} nor {' + '.join(TOKENIZER_FILES)} "
                f"(missing {', '.join(missing)})"
            )
    try:
        tokenizer = ClipTokenizer.from_folder(folder)
    except EngineError as error:
        raise ModelFolderError(f"{what}: {error}") from None
    embeddings = text_encoder_config.get("vocab_size")
    if isinstance(embeddings, int) and tokenizer.vocab_size > embeddings:
        raise ModelFolderError(
            f"{what}: {folder} has {tokenizer.vocab_size} token ids, but the text encoder embeds "
            f"only {embeddings} (vocab_size in {encoder}/config.json)"
        )


def find_weights(folder: Path, stems: tuple[str, ...]) -> WeightsFile:
    """The weights file diffusers would load: safetensors before .bin, full precision before fp16."""
    for variant in (None, "fp16"):
        for suffix, safe in ((".safetensors", True), (".bin", False)):
            for stem in stems:
                name = f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}"
                if (folder / name).is_file():
                    return WeightsFile(folder / name, variant, safe)
    sharded = sorted(folder.glob("*.index.json"))
    if sharded:
        raise ModelFolderError(f"{folder.name}: sharded weights ({sharded[0].name}) are not supported yet")
    raise ModelFolderError(f"{folder.name}: no weights file in {folder} (expected {stems[0]}.safetensors)")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, byte offsets)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ModelFolderError(f"corrupt weights file {path}: {len(raw)} bytes, too short")
            (length,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if length > min(100_000_000, size - 8):
                raise ModelFolderError(
                    f"not a safetensors file, or a corrupt one: {path} (its first 8 bytes give a header of "
                    f"{length:,} bytes; the file has {size:,})"
                )
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"corrupt weights file {path}: {error}") from None
    header["__header_bytes__"] = 8 + length
    return header


def check_safetensors(path: Path) -> None:
    """Raise if the file is shorter than its header says (an interrupted copy or download)."""
    header = safetensors_header(path)
    start = header.pop("__header_bytes__")
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    size = path.stat().st_size
    if size < start + end:
        raise ModelFolderError(
            f"truncated weights file {path}: {size} bytes on disk, its header needs {start + end}"
        )


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file."""
    header = safetensors_header(path)
    header.pop("__header_bytes__")
    header.pop("__metadata__", None)
    return {name: tuple(entry["shape"]) for name, entry in header.items()}
