"""`export --torch-only`: a manifest and tokenizer without ONNX, that the torch backend runs and every
ONNX reader refuses in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.errors import EngineError, EngineFolderError
from engine.export import ExportSettings, export_model
from engine.manifest import MANIFEST_NAME, TOKENIZER_DIR, Manifest, read_manifest
from engine.pipeline import Pipeline
from engine.specs import Network, Precision
from engine.tensorrt.builder import build_engine

REFUSAL = "was exported with --torch-only"
FIX = "export again without --torch-only for onnxruntime / openvino / tensorrt"


@pytest.fixture(scope="module")
def torch_only(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The tiny model exported --torch-only, and the export's progress lines."""
    lines: list[str] = []
    target = tmp_path_factory.mktemp("torch-only") / "engine"
    result = export_model(tiny_model, target, ExportSettings(torch_only=True), progress=lines.append)
    return result.engine_dir, lines


def _one_line(error: pytest.ExceptionInfo[Exception], folder: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and REFUSAL in message and FIX in message
    return message


def test_writes_the_manifest_and_tokenizer_only(torch_only: tuple[Path, list[str]]) -> None:
    folder, lines = torch_only
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_NAME, TOKENIZER_DIR]
    assert not list(folder.parent.glob(".*"))  # the staging folder went into place
    assert any("no ONNX" in line for line in lines)
    manifest = read_manifest(folder)
    assert manifest.torch_only and set(manifest.graphs) == set(manifest.dims.networks)
    for entry in manifest.graphs.values():
        assert not entry.has_onnx and entry.file is None and entry.sha256 is None
        assert entry.parity == {} and entry.onnxruntime is None and entry.precision is Precision.FP32
        assert "onnx" not in entry.exporter


def test_records_what_a_full_export_records(torch_only: tuple[Path, list[str]], tiny_engine: Path) -> None:
    """Same specs, dims, scheduler and source identity (hashes) as the normal export of the same model."""
    only, full = read_manifest(torch_only[0]), read_manifest(tiny_engine)
    assert not full.torch_only and all(entry.has_onnx for entry in full.graphs.values())
    assert {n: e.spec for n, e in only.graphs.items()} == {n: e.spec for n, e in full.graphs.items()}
    assert only.dims == full.dims and only.scheduler_config == full.scheduler_config
    assert only.source == full.source and only.source["short_hash"]
    tokenizer = sorted(p.name for p in (torch_only[0] / TOKENIZER_DIR).iterdir())
    assert tokenizer == sorted(p.name for p in (tiny_engine / TOKENIZER_DIR).iterdir())


def test_manifest_json_round_trips(torch_only: tuple[Path, list[str]], tiny_engine: Path) -> None:
    """Both kinds of manifest.json (a full export's: as before) rebuild to the same JSON and manifest."""
    for folder in (torch_only[0], tiny_engine):
        data = json.loads((folder / MANIFEST_NAME).read_text())
        manifest = Manifest.from_json(data)
        assert manifest.to_json() == data
        assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    graphs = json.loads((torch_only[0] / MANIFEST_NAME).read_text())["graphs"]
    assert all(graph["file"] is None and graph["sha256"] is None for graph in graphs.values())


def test_a_hash_without_a_file_is_corrupt(torch_only: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder = tmp_path / "engine"
    shutil.copytree(torch_only[0], folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["graphs"]["unet"]["sha256"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(EngineFolderError, match=r"corrupt .*unet: a graph without an ONNX file"):
        read_manifest(folder)


@pytest.mark.parametrize("backend", [None, "onnxruntime", "openvino", "tensorrt"])
def test_onnx_backends_refuse_it(torch_only: tuple[Path, list[str]], backend: str | None) -> None:
    folder = torch_only[0]
    with pytest.raises(EngineFolderError) as error:
        Pipeline.load(folder) if backend is None else Pipeline.load(folder, backend=backend)
    assert f"the {backend or 'onnxruntime'} backend" in _one_line(error, folder)


def test_build_refuses_it_before_looking_for_tensorrt(torch_only: tuple[Path, list[str]], capsys) -> None:
    folder = torch_only[0]
    with pytest.raises(EngineFolderError) as error:
        build_engine(folder)
    _one_line(error, folder)
    assert main(["build", str(folder)]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [f"sd-engine: error: {error.value}"]


def test_generate_on_torch_gives_the_normal_exports_image(
    torch_only: tuple[Path, list[str]], tiny_engine: Path, tmp_path: Path, capsys
) -> None:
    args = ["a red fox", "--backend", "torch", "--steps", "3", "--size", "64x48", "--seed", "5"]
    images = []
    for name, folder in (("only", torch_only[0]), ("full", tiny_engine)):
        out = tmp_path / f"{name}.png"
        assert main(["generate", str(folder), *args, "-o", str(out)]) == 0, capsys.readouterr().err
        with Image.open(out) as image:
            images.append((np.asarray(image), image.info["parameters"]))
    (only, only_info), (full, full_info) = images
    assert only.shape == (48, 64, 3) and only.std() > 0
    np.testing.assert_array_equal(only, full)
    assert only_info == full_info  # the same Model hash too


def test_cli_says_it_wrote_no_onnx(tiny_model: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "engine"
    assert main(["export", str(tiny_model), str(target), "--torch-only", "--networks", "text_encoder"]) == 0
    err = capsys.readouterr().err
    assert "no ONNX" in err and "--backend torch or torch-cuda" in err
    assert set(read_manifest(target).graphs) == {Network.TEXT_ENCODER}
    assert main(["export", str(tiny_model), str(target), "--torch-only", "--fp16"]) != 0
    assert "--fp16 has no effect with --torch-only" in capsys.readouterr().err


def test_staged_like_a_normal_export(tiny_model: Path, tmp_path: Path) -> None:
    """A non-empty target is refused unless overwriting, and then replaced whole."""
    target = tmp_path / "engine"
    target.mkdir()
    (target / "unet.onnx").write_bytes(b"old")
    settings = ExportSettings(networks=(Network.TEXT_ENCODER,), torch_only=True)
    with pytest.raises(EngineError, match="not empty"):
        export_model(tiny_model, target, settings)
    assert (target / "unet.onnx").read_bytes() == b"old"
    overwrite = ExportSettings(networks=(Network.TEXT_ENCODER,), torch_only=True, overwrite=True)
    export_model(tiny_model, target, overwrite)
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST_NAME, TOKENIZER_DIR]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
