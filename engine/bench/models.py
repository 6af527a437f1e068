"""The model folder and engine folder a benchmark runs on, built into a cache when not given.

A preset (``--preset sd15``) becomes a random-weight diffusers folder under
``$SD_ENGINE_HOME/bench/models`` (default ``~/.cache/sd-engine/bench``), written once per preset
and seed (the weights are a pure function of both). Without ``--engine``, the model is exported
into ``bench/engines/<name>-<key>``, where the key hashes the model folder's files (path, size,
modification time) and the sd-engine version: a changed model gets a fresh engine.

SD 1.x / 2.x and SDXL folders are told apart by model_index.json's ``_class_name``, which also picks
diffusers' pipeline class for the diffusers contender (:func:`is_xl_folder`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine import __version__
from engine.bench.child import child_env
from engine.bench.config import Contender
from engine.errors import EngineError

PRESET_SEED = 0
EXPORT_NEEDS = ("torch", "diffusers", "transformers", "onnx")
DEFAULT_SIDE = 256  # --size for SD 1.x / 2.x: a quick run
XL_SIDE = 1024  # --size for an SDXL folder whose VAE config states no sample_size (SDXL base's)


@dataclass(frozen=True)
class ModelChoice:
    """What the user asked for: a model folder or a preset, and optionally an engine folder."""

    model_dir: Path | None
    preset: str | None
    engine_dir: Path | None


@dataclass(frozen=True)
class Folders:
    model_dir: Path
    engine_dir: Path | None  # None when no sd-engine contender runs
    label: str


def bench_home() -> Path:
    from engine.commands.default_engine import engine_home

    return engine_home() / "bench"


def check_choice(choice: ModelChoice, contenders: tuple[Contender, ...]) -> None:
    """Fail fast on folders that do not exist and presets that do not exist."""
    import importlib.util

    from engine.models.presets import parse_preset

    if (choice.model_dir is None) == (choice.preset is None):
        raise ValueError("give exactly one of --model MODEL_DIR or --preset NAME")
    if choice.preset is not None:
        parse_preset(choice.preset)
    elif not (choice.model_dir / "model_index.json").is_file():
        raise ValueError(f"model folder not found (no model_index.json): {choice.model_dir}")
    else:
        check_pipeline_class(choice.model_dir)
    wants_engine = any(c.is_engine for c in contenders)
    if choice.engine_dir is not None and wants_engine:
        if not (choice.engine_dir / "manifest.json").is_file():
            raise ValueError(
                f"engine folder not found (no manifest.json): {choice.engine_dir}; "
                "leave out --engine to export the model into the benchmark cache"
            )
    elif wants_engine and not _engine_cached(choice):
        missing = [m for m in EXPORT_NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(
                f"exporting the model needs {', '.join(missing)}: pip install 'sd-engine[export]'"
            )


def prepare(
    choice: ModelChoice, contenders: tuple[Contender, ...], progress: Callable[[str], None]
) -> Folders:
    """The folders to run on, building the preset model and the engine when missing."""
    model_dir = model_dir_of(choice)
    if choice.preset is not None and not (model_dir / "model_index.json").is_file():
        progress(f"writing the {choice.preset} preset (random weights, seed {PRESET_SEED}) to {model_dir}")
        sd_engine(["init-random", choice.preset, str(model_dir), "--seed", str(PRESET_SEED), "--overwrite"])
    label = label_of(choice)
    if not any(c.is_engine for c in contenders):
        return Folders(model_dir.absolute(), None, label)
    engine_dir = choice.engine_dir or _cached_engine(model_dir, label, progress)
    return Folders(model_dir.absolute(), engine_dir.absolute(), label)


def pipeline_class(model_dir: Path) -> str:
    """model_index.json's ``_class_name`` ("" when the file is missing, unreadable or names none)."""
    try:
        index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ""
    return str(index.get("_class_name", "")) if isinstance(index, dict) else ""


def check_pipeline_class(model_dir: Path) -> None:
    """ValueError for a folder of a pipeline the benchmark does not run (neither SD 1.x / 2.x nor XL)."""
    from engine.models.folder import SUPPORTED_PIPELINES

    name = pipeline_class(model_dir)
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{model_dir / 'model_index.json'} names the pipeline {name or 'none'!r}; the benchmark runs "
            f"Stable Diffusion 1.x / 2.x / XL folders ({', '.join(SUPPORTED_PIPELINES)})"
        )


def is_xl_folder(model_dir: Path) -> bool:
    """Whether a diffusers folder holds an SDXL model (its model_index.json's ``_class_name``)."""
    from engine.models.folder import XL_PIPELINES

    return pipeline_class(model_dir) in XL_PIPELINES


def default_size(choice: ModelChoice) -> tuple[int, int]:
    """(width, height) in px when ``--size`` is not given: 256 for SD 1.x / 2.x (a quick run); an SDXL
    model's native size, its VAE config's ``sample_size`` (1024 for SDXL base and the sdxl preset, 64 for
    tiny-xl), since SDXL is trained at that size. Reads only the preset's spec or the folder's JSON; a
    folder that cannot be read gets 256 (:func:`check_choice` says what is wrong with it)."""
    from engine.models.presets import preset_spec

    if choice.preset is not None:
        spec = preset_spec(choice.preset)
        side = spec.vae.sample_size if spec.is_xl else DEFAULT_SIDE
    elif choice.model_dir is not None and is_xl_folder(choice.model_dir):
        side = _vae_sample_size(choice.model_dir) or XL_SIDE
    else:
        side = DEFAULT_SIDE
    return side, side


def _vae_sample_size(model_dir: Path) -> int | None:
    """vae/config.json's ``sample_size`` (an int or [height, width] in diffusers; the first side), or None."""
    try:
        config = json.loads((model_dir / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    size = config.get("sample_size") if isinstance(config, dict) else None
    size = size[0] if isinstance(size, list) and size else size
    return size if isinstance(size, int) and size > 0 and size % 8 == 0 and size <= 4096 else None


def model_dir_of(choice: ModelChoice) -> Path:
    if choice.model_dir is not None:
        return choice.model_dir
    return bench_home() / "models" / f"{choice.preset}-seed{PRESET_SEED}"


def label_of(choice: ModelChoice) -> str:
    """The model's name in reports: the preset, else the folder's name."""
    return choice.preset or model_dir_of(choice).resolve().name


def _engine_cached(choice: ModelChoice) -> bool:
    model_dir = model_dir_of(choice)
    return model_dir.is_dir() and (engine_cache_dir(model_dir, label_of(choice)) / "manifest.json").is_file()


def engine_cache_dir(model_dir: Path, label: str) -> Path:
    return bench_home() / "engines" / f"{label}-{model_key(model_dir)}"


def model_key(model_dir: Path) -> str:
    """A short key of the model folder's files (relative path, size, mtime) and sd-engine's version."""
    digest = hashlib.sha256(f"sd-engine {__version__}\n".encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_dir)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _cached_engine(model_dir: Path, label: str, progress: Callable[[str], None]) -> Path:
    target = engine_cache_dir(model_dir, label)
    if not (target / "manifest.json").is_file():
        progress(f"exporting {model_dir} to {target} (once; later runs reuse it)")
        sd_engine(["export", str(model_dir), str(target), "--overwrite"])
    return target


def sd_engine(arguments: list[str]) -> None:
    """Run an `sd-engine` command in its own process: torch stays out of the harness's process, so
    its memory is not held while contenders run."""
    process = subprocess.run(
        [sys.executable, "-m", "engine.cli", *arguments],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if process.returncode != 0:
        raise EngineError(f"`sd-engine {arguments[0]}` failed (exit code {process.returncode}, see above)")
