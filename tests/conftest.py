"""Shared fixtures: tiny random-weight model folders and their exported engine folders, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models.presets import init_random

    return init_random("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("engines") / "tiny").engine_dir


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models.presets import init_random

    return init_random("tiny-v", tmp_path_factory.mktemp("models") / "tiny-v", seed=1)


@pytest.fixture(scope="session")
def tiny_v_engine(tiny_v_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2 style (v-prediction, "!" padding); no VAE encoder, to keep CI fast."""
    from engine.export import ExportSettings, export_model
    from engine.specs import Network

    settings = ExportSettings(networks=(Network.TEXT_ENCODER, Network.UNET, Network.VAE_DECODER))
    return export_model(tiny_v_model, tmp_path_factory.mktemp("engines") / "tiny-v", settings).engine_dir
