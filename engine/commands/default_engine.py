"""The built-in default engine: the tiny random-weight preset, built on first use and cached.

``sd-engine generate PROMPT`` without an engine folder lands here. The first run writes the tiny
preset's diffusers folder and exports it (about a minute on 2 cores, needs the ``export`` extra);
later runs find a valid manifest and reuse the folder. A lock file keeps two first runs from
building at once; both builders are atomic, so an interrupted build leaves nothing that looks
complete. No torch import at module level: reusing a built engine must stay light.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.errors import EngineError, MissingDependencyError

log = logging.getLogger(__name__)

HOME_ENV = "SD_ENGINE_HOME"
DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0
BUILD_DEPENDENCIES = ("torch", "diffusers", "transformers", "onnx")


def engine_home() -> Path:
    """$SD_ENGINE_HOME, else ~/.cache/sd-engine."""
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "sd-engine"


def default_engine_dir() -> Path:
    return engine_home() / "engines" / DEFAULT_PRESET


def default_engine_ready() -> bool:
    """Whether the default engine folder exists with a manifest this version reads."""
    from engine.manifest import read_manifest

    try:
        read_manifest(default_engine_dir())
    except EngineError:
        return False
    return True


def check_build_dependencies() -> None:
    """Raise MissingDependencyError with an install hint when the export extra is missing."""
    missing = [name for name in BUILD_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"building the default engine needs {', '.join(missing)}: "
            'pip install "sd-engine[export]" (or pass an ENGINE_DIR)'
        )


@contextlib.contextmanager
def _locked(lock_path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic builders still keep folders whole
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another sd-engine process building the default engine ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_engine(progress: Callable[[str], None] = log.info) -> Path:
    """The default engine's folder, built first if it is missing or unreadable by this version."""
    target = default_engine_dir()
    if default_engine_ready():
        return target
    check_build_dependencies()
    home = engine_home()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock", progress):
        if default_engine_ready():  # another process built it while we waited
            return target
        _build(home, target, progress)
    return target


def _build(home: Path, target: Path, progress: Callable[[str], None]) -> None:
    from engine.export import ExportSettings, export_model
    from engine.models.presets import init_random

    progress(f"building the default engine ({DEFAULT_PRESET} preset, first run only) in {target}")
    model = init_random(DEFAULT_PRESET, home / "models" / DEFAULT_PRESET, seed=DEFAULT_SEED, overwrite=True)
    export_model(model, target, ExportSettings(overwrite=True), progress=progress)
