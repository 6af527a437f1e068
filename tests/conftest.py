"""Shared fixtures: tiny random-weight model folders and their exported engine folders, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.presets import init_random

    return init_random("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("engines") / "tiny").engine_dir
