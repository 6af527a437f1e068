"""Shared fixtures: tiny random-weight model folders and their exported engine folders, built once.

Engine exports that later tests need (``tiny_v_engine``, ...) are built in a background process while
the tests before them run: see tests/prefetch.py."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest

from tests import prefetch
from tests.prefetch import prefetched

# Data the tests read, vendored with its licence (tests/data/*/LICENSE): a clean clone runs every test.
DATA = Path(__file__).resolve().parent / "data"
PARTI_PROMPTS = DATA / "partiprompts" / "PartiPrompts.tsv"
# Set to replay a failing test's random inputs: SD_ENGINE_TEST_SEED=<the seed it printed>.
SEED_VARIABLE = "SD_ENGINE_TEST_SEED"


def draw_seed() -> int:
    """The pinned seed from SD_ENGINE_TEST_SEED, else a fresh one in 0..2^32-1."""
    pinned = os.environ.get(SEED_VARIABLE, "").strip()
    if not pinned:
        return secrets.randbits(32)
    try:
        return int(pinned, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE}={pinned!r} is not an integer seed") from None


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs for one test, reproducible from the seed it prints.

    pytest shows the print under "Captured stdout setup" when the test fails; the seed is also in the
    test's user_properties (junit XML). Replay with SD_ENGINE_TEST_SEED=<seed>.
    """
    seed = draw_seed()
    print(f"rng seed {seed} (replay: {SEED_VARIABLE}={seed})")
    request.node.user_properties.append(("rng_seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models.presets import init_random

    return init_random("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("engines") / "tiny").engine_dir


@pytest.fixture(scope="session")
def tiny_torch_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch-only engine folder of the tiny model (manifest and tokenizer, no ONNX): all the torch
    backends read, made in seconds, where ``tiny_engine``'s ONNX export takes a minute (of a GPU slot,
    on the GPU tests) and depends on the machine's onnx / onnxscript versions."""
    from engine.export import ExportSettings, export_model

    folder = tmp_path_factory.mktemp("engines") / "tiny-torch"
    return export_model(tiny_model, folder, ExportSettings(torch_only=True)).engine_dir


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models.presets import init_random

    return init_random("tiny-v", tmp_path_factory.mktemp("models") / "tiny-v", seed=1)


def build_tiny_v_engine(folder: Path) -> None:
    """The tiny-v model (as ``tiny_v_model``: same preset and seed, so the same bytes) and its engine,
    without the VAE encoder, to keep CI fast. Usually built in the background (tests/prefetch.py)."""
    from engine.export import ExportSettings, export_model
    from engine.models.presets import init_random
    from engine.specs import Network

    model = init_random("tiny-v", folder / "tiny-v", seed=1)
    settings = ExportSettings(networks=(Network.TEXT_ENCODER, Network.UNET, Network.VAE_DECODER))
    export_model(model, folder / "engine", settings)


@pytest.fixture(scope="session")
def tiny_v_engine(tiny_v_model: Path, request: pytest.FixtureRequest) -> Path:
    """SD 2 style (v-prediction, "!" padding), exported from a copy of ``tiny_v_model`` (checked: the
    same A1111 hash); no VAE encoder."""
    from engine.manifest import read_manifest
    from engine.models.source import SourceOptions, open_model_source

    engine = prefetched(request) / "engine"
    exported_from = read_manifest(engine).source["sha256"]
    assert exported_from == open_model_source(tiny_v_model, SourceOptions()).identity.sha256
    return engine


def build_tiny_xl_engine(folder: Path) -> None:
    """The tiny-xl model (SDXL-shaped, seed 2) in ``folder/tiny-xl`` and its full engine in
    ``folder/engine``. Usually built in the background (tests/prefetch.py)."""
    from engine.export import export_model
    from engine.models.presets import init_random

    model = init_random("tiny-xl", folder / "tiny-xl", seed=2)
    export_model(model, folder / "engine")


@pytest.fixture(scope="session")
def tiny_xl_engine(request: pytest.FixtureRequest) -> Path:
    """An SDXL-shaped engine (two text encoders, text_time conditioning), every network exported; its
    diffusers folder is :func:`tiny_xl_model`."""
    return prefetched(request) / "engine"


@pytest.fixture(scope="session")
def tiny_xl_model(tiny_xl_engine: Path) -> Path:
    """The diffusers folder ``tiny_xl_engine`` was exported from (StableDiffusionXLPipeline loads it)."""
    return tiny_xl_engine.parent / "tiny-xl"


def pytest_collection_finish(session: pytest.Session) -> None:
    prefetch.start(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    prefetch.stop(session.config)
