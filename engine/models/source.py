"""The model a user points export at: a diffusers folder or a single-file checkpoint, plus a VAE swap.

:func:`open_model_source` validates it (headers and configs only, no weights loaded) and returns a
:class:`ModelSource`: the diffusers configs of the three networks and the scheduler (outdated
scheduler configs migrated as diffusers' StableDiffusionPipeline migrates them), the prediction
type and how it was decided, what to copy as the tokenizer, and the model's identity for A1111
tools (:class:`ModelIdentity`). ``load()`` builds the float32 torch networks; export and the torch
backends both go through it, so a single-file checkpoint works wherever a folder does.

Export side only: ``load()`` imports torch.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineFolderError, ModelFolderError
from engine.hashing import json_digest, sha256_file
from engine.models.folder import ModelFolder, inspect_model_folder
from engine.sampling.config import migrate_scheduler_config

if TYPE_CHECKING:
    from engine.manifest import Manifest
    from engine.models.checkpoint.single_file import Checkpoint
    from engine.models.torch_modules import SourceModel

SHORT_HASH_DIGITS = 10  # A1111's short "Model hash": the first 10 hex digits of the file's sha256
PREDICTION_TYPES = ("epsilon", "v_prediction")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FOLDER_HASH_SCHEME = "sd-engine-folder-v1"
FILE_HASH_SCHEME = "a1111-sha256"


class SourceKind(str, Enum):
    DIFFUSERS_FOLDER = "diffusers-folder"
    SINGLE_FILE = "single-file"


@dataclass(frozen=True)
class SourceOptions:
    """How to read a model: the user's export options.

    vae: a diffusers AutoencoderKL folder or a single-file VAE that replaces the model's own.
    ema: take a single-file checkpoint's EMA UNet weights (``model_ema.*``) instead of the plain ones.
    prediction_type: "epsilon" or "v_prediction", overriding whatever the model says.
    config_dir: a diffusers folder whose configs (and tokenizer) describe a single-file checkpoint's
    architecture, instead of the built-in SD 1.5 / SD 2.1 presets.
    ``vae`` and ``config_dir`` may be given as str (made Path); an unknown prediction type raises
    ModelFolderError.
    """

    vae: Path | None = None
    ema: bool = False
    prediction_type: str | None = None
    config_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("vae", "config_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ModelFolderError(
                f"unknown prediction type {self.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "vae": str(self.vae.absolute()) if self.vae else None,
            "ema": self.ema,
            "prediction_type": self.prediction_type,
            "config_dir": str(self.config_dir.absolute()) if self.config_dir else None,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> SourceOptions:
        return SourceOptions(
            vae=Path(data["vae"]) if data.get("vae") else None,
            ema=bool(data.get("ema", False)),
            prediction_type=data.get("prediction_type"),
            config_dir=Path(data["config_dir"]) if data.get("config_dir") else None,
        )


@dataclass(frozen=True)
class ModelIdentity:
    """What A1111 tools and model sites know a model by.

    sha256: for a single file, the sha256 of its bytes (A1111's "sha256" hash; model sites list it).
    For a diffusers folder, which A1111 never hashes, :func:`folder_hash`. ``short``: the first 10
    hex digits, A1111's ``Model hash`` / ``VAE hash`` in infotext.
    """

    name: str
    sha256: str
    scheme: str

    @property
    def short(self) -> str:
        return self.sha256[:SHORT_HASH_DIGITS]

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "short_hash": self.short,
            "hash_scheme": self.scheme,
        }


def file_identity(path: Path) -> ModelIdentity:
    """A1111's identity of a checkpoint or VAE file: its stem and the sha256 of its bytes."""
    return ModelIdentity(path.stem, sha256_file(path), FILE_HASH_SCHEME)


def folder_hash(weights: Mapping[str, Path]) -> str:
    """The stable hash of a diffusers folder: sha256 of the JSON ``{component: sha256 of its weights
    file}`` (keys sorted, json.dumps defaults) over the files a load reads (unet, vae, text_encoder).

    It depends only on the weights' bytes: the same folder copied, renamed or re-saved with other
    configs formatting keeps it; any changed weight changes it.
    """
    return json_digest({component: sha256_file(path) for component, path in sorted(weights.items())})


@dataclass(frozen=True)
class ModelSource:
    """A validated model, ready to load: see the module docstring."""

    path: Path
    kind: SourceKind
    family: str  # "sd1" | "sd2" | "sdxl"
    # "unet", "vae", "text_encoder", "scheduler" (diffusers configs); SDXL adds "text_encoder_2"
    configs: Mapping[str, Mapping[str, Any]]
    prediction_type: str
    prediction_source: str  # how prediction_type was decided: "config", "option", "yaml", ...
    identity: ModelIdentity
    options: SourceOptions = SourceOptions()
    vae_identity: ModelIdentity | None = None
    notes: tuple[str, ...] = ()  # what was decided, one line each, for the log
    migrations: tuple[str, ...] = ()  # outdated scheduler settings changed, one warning line each
    folder: ModelFolder | None = field(default=None, repr=False)
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer folders the model has, one per text encoder (SDXL: tokenizer, tokenizer_2)."""
        return ("tokenizer", "tokenizer_2") if "text_encoder_2" in self.configs else ("tokenizer",)

    def write_tokenizer(self, target: Path, component: str = "tokenizer") -> None:
        """Copy the model's ``component`` tokenizer folder (``tokenizer`` or SDXL's ``tokenizer_2``) to
        ``target``; for single files without one, the bundled CLIP BPE padded as the model's family pads
        (SD 2 and SDXL's second tokenizer: "!", else EOS)."""
        if self.folder:
            source: Path | None = self.folder.root / component
        else:
            source = (
                self.checkpoint.tokenizer_dir if component == "tokenizer" else self.checkpoint.tokenizer_2_dir
            )
        if source is not None:
            shutil.copytree(source, target)
            return
        from engine.text.tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, bundled_bpe_path, write_tokenizer_folder

        bang = self.family == "sd2" or component == "tokenizer_2"
        write_tokenizer_folder(bundled_bpe_path(), target, SD2_PAD_TOKEN if bang else EOS_TOKEN)

    def load(self, only: Collection[str] | None = None) -> SourceModel:
        """The networks as float32 torch modules in eval mode (imports torch); ``only``: just these
        components ("unet", "vae", "text_encoder", "text_encoder_2"), the others None."""
        from engine.models.torch_modules import load_source_model

        if self.checkpoint is not None:
            from engine.models.checkpoint.single_file import load_checkpoint

            return replace(load_checkpoint(self.checkpoint, only), xl=self.family == "sdxl")
        return load_source_model(self.folder, vae=self.options.vae, only=only)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: whether an empty negative prompt conditions on zeros (model_index.json's flag, as
        diffusers' StableDiffusionXLPipeline reads it; true when absent and for single files)."""
        index = self.folder.index if self.folder else {}
        return bool(index.get("force_zeros_for_empty_prompt", True))

    def manifest_source(self) -> dict[str, Any]:
        """The manifest's ``source``: where the model came from, its identity and how it was read."""
        source: dict[str, Any] = {
            "kind": self.kind.value,
            "path": str(self.path.absolute()),
            **self.identity.to_json(),
            "prediction_source": self.prediction_source,
            "options": self.options.to_json(),
            "vae": self.vae_identity.to_json() if self.vae_identity else None,
            "notes": list(self.notes),
            "scheduler_migrations": list(self.migrations),
        }
        if self.family == "sdxl":
            source["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
        if self.folder is not None:
            source.update(
                model_dir=str(self.folder.root.absolute()),
                pipeline_class=self.folder.pipeline_class,
                variant=self.folder.variant,
                weights={  # the files this export read: a swapped VAE is under "vae" above instead
                    name: str(w.path.absolute())
                    for name, w in self.folder.weights.items()
                    if not (name == "vae" and self.vae_identity)
                },
            )
        return source


def open_model_source(path: str | Path, options: SourceOptions = SourceOptions()) -> ModelSource:
    """Validate a diffusers folder or a single-file checkpoint (and ``options.vae``); one-line
    ModelFolderError naming the problem. Hashes the weights (about 1 s per GB)."""
    root = Path(path)
    if root.is_dir():
        source = _folder_source(root, options)
    elif root.is_file():
        source = _checkpoint_source(root, options)
    else:
        raise ModelFolderError(f"model not found: {root} (a diffusers folder or a .safetensors checkpoint)")
    return _with_vae(source, options.vae) if options.vae else source


def checked_scheduler_config(config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The config migrated (:func:`engine.sampling.config.migrate_scheduler_config`) and checked by
    building a scheduler from it, so a malformed one fails at export (ModelFolderError), not at the
    first generation."""
    from engine import schedulers

    migrated, migrations = migrate_scheduler_config(config)
    try:
        schedulers.create("DDIM", migrated)
    except ValueError as error:
        raise ModelFolderError(f"{where}: {error}") from None
    return migrated, migrations


def _folder_source(root: Path, options: SourceOptions) -> ModelSource:
    if options.ema:
        raise ModelFolderError(f"--ema applies to single-file checkpoints; {root} is a diffusers folder")
    if options.config_dir is not None:
        raise ModelFolderError(f"--config applies to single-file checkpoints; {root} is a diffusers folder")
    from engine.models.torch_modules import check_folder_weights

    folder = inspect_model_folder(root)
    check_folder_weights(folder, options.vae)
    scheduler, migrations = checked_scheduler_config(
        folder.configs["scheduler"], str(root / "scheduler" / "scheduler_config.json")
    )
    prediction, decided = str(scheduler.get("prediction_type", "epsilon")), "config"
    if options.prediction_type is not None:
        prediction, decided = options.prediction_type, "option"
    scheduler = {**scheduler, "prediction_type": prediction}
    weights = {name: w.path for name, w in folder.weights.items()}
    return ModelSource(
        path=root,
        kind=SourceKind.DIFFUSERS_FOLDER,
        family=folder.family,
        configs={**folder.configs, "scheduler": scheduler},
        prediction_type=prediction,
        prediction_source=decided,
        identity=ModelIdentity(root.name, folder_hash(weights), FOLDER_HASH_SCHEME),
        options=options,
        migrations=migrations,
        folder=folder,
    )


def _checkpoint_source(path: Path, options: SourceOptions) -> ModelSource:
    from engine.models.checkpoint.single_file import inspect_checkpoint

    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelFolderError(
            f"{path}: not a model (expected a diffusers folder or a checkpoint file: "
            f"{', '.join(CHECKPOINT_SUFFIXES)})"
        )
    checkpoint = inspect_checkpoint(path, options)
    scheduler, migrations = checked_scheduler_config(checkpoint.configs["scheduler"], "scheduler config")
    return ModelSource(
        path=path,
        kind=SourceKind.SINGLE_FILE,
        family=checkpoint.family,
        configs={**checkpoint.configs, "scheduler": scheduler},
        prediction_type=checkpoint.prediction_type,
        prediction_source=checkpoint.prediction_source,
        identity=file_identity(path),
        options=options,
        notes=checkpoint.notes,
        migrations=migrations,
        checkpoint=checkpoint,
    )


def _with_vae(source: ModelSource, vae_path: Path) -> ModelSource:
    """The source with its VAE config replaced by the swapped-in VAE's (scaling factor included);
    a single-file VAE is checked against the model's own VAE architecture. The VAE's identity is its
    name (see :func:`vae_name`) and the sha256 of the weights file it was read from."""
    from engine.models.checkpoint.vae import read_vae

    vae = read_vae(vae_path, config=source.configs["vae"])
    identity = ModelIdentity(vae_name(vae_path), sha256_file(vae.weights_path), FILE_HASH_SCHEME)
    # A checkpoint source already said so in its notes (it reads the VAE itself).
    notes = source.notes if source.checkpoint else (*source.notes, f"VAE replaced by {vae_path}")
    return replace(
        source, configs={**source.configs, "vae": dict(vae.config)}, vae_identity=identity, notes=notes
    )


def vae_name(path: Path) -> str:
    """A1111's ``VAE`` name: a file's stem; a folder's name, or its parent's when it is a model's
    ``vae/`` subfolder (``sd-vae-ft-mse/`` -> "sd-vae-ft-mse", ``my-model/vae/`` -> "my-model")."""
    if path.is_file():
        return path.stem
    absolute = path.absolute()
    return absolute.parent.name if absolute.name == "vae" else absolute.name


def source_from_manifest(manifest: Manifest) -> ModelSource:
    """The model an engine folder was exported from, opened again with the same options (what the
    torch backends run); one-line EngineFolderError when the manifest names none or it is gone."""
    source = manifest.source
    path = source.get("path") or source.get("model_dir")
    if not path or not Path(path).exists():
        raise EngineFolderError(
            f"the torch backends need the source model {path!r} named in the manifest: not found"
        )
    return open_model_source(path, SourceOptions.from_json(source.get("options") or {}))
