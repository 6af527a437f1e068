"""Several engine folders behind one server: /sd-models lists them, options and override_settings
switch between them, and loaded pipelines stay within the memory budget (least recently used out)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.service.catalog import Catalog, read_entry

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def two_engines(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served")
    return shutil.copytree(tiny_engine, root / "alpha"), shutil.copytree(tiny_engine, root / "beta")


def test_same_model_twice_gets_one_title_per_folder(two_engines: tuple[Path, Path]) -> None:
    catalog = Catalog.open(list(two_engines))
    titles = [entry.title for entry in catalog.entries]
    assert len(set(titles)) == 2
    assert [catalog.find(title).name for title in titles] == ["alpha", "beta"]


def test_two_folders_with_one_name_are_refused(two_engines: tuple[Path, Path], tmp_path: Path) -> None:
    other = shutil.copytree(two_engines[0], tmp_path / "alpha")
    with pytest.raises(EngineError, match="both named 'alpha'"):
        Catalog.open([two_engines[0], other])


def test_switching_models_and_the_memory_budget(make_server, two_engines: tuple[Path, Path]) -> None:
    one_model = read_entry(two_engines[0]).weight_bytes
    live = make_server(engines=two_engines, memory_budget_bytes=one_model)
    models = live.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["alpha", "beta"]
    assert live.state.pool.loaded() == ["alpha"]

    beta = models[1]["title"]
    by_override = live.post(
        "/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": beta}}
    )
    assert by_override.status_code == 200, by_override.text
    assert live.state.pool.loaded() == ["beta"]  # alpha was idle: unloaded to stay within the budget
    assert live.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]  # not switched

    assert live.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"}).status_code == 200
    assert live.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == beta
    switched = live.post("/sdapi/v1/txt2img", json=SMALL)
    assert switched.status_code == 200
    assert '"sd_model_name": "beta"' in switched.json()["info"]
    assert by_override.json()["images"] == switched.json()["images"]  # same weights, same seed

    back = live.post(
        "/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "alpha"}}
    )
    assert back.status_code == 200
    assert live.state.pool.loaded() == ["alpha"]
    assert '"sd_model_name": "alpha"' in back.json()["info"]


@pytest.mark.parametrize("name", ["gamma", "../alpha", "/etc/passwd", ""])
def test_unknown_models_are_404_naming_them(make_server, two_engines: tuple[Path, Path], name: str) -> None:
    live = make_server(engines=two_engines)
    answer = live.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
    assert answer.status_code == 404
    assert repr(name) in answer.json()["detail"]
