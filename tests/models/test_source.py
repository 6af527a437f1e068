"""Model sources: identity (A1111 hashes), options that do not apply, what the manifest records."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ModelFolderError
from engine.manifest import read_manifest
from engine.models.folder import inspect_model_folder
from engine.models.source import (
    FOLDER_HASH_SCHEME,
    SourceKind,
    SourceOptions,
    file_identity,
    folder_hash,
    open_model_source,
)
from engine.pipeline import Pipeline


def _weights(folder: Path) -> dict[str, Path]:
    return {name: w.path for name, w in inspect_model_folder(folder).weights.items()}


def test_a1111_hash_is_the_sha256_of_the_file_and_its_first_ten_digits(tmp_path: Path) -> None:
    path = tmp_path / "dreamy-v2.safetensors"
    path.write_bytes(b"\x00weights" * 1000)
    identity = file_identity(path)
    assert identity.name == "dreamy-v2"
    assert identity.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert identity.short == identity.sha256[:10]


def test_folder_hash_follows_the_weights_not_names_or_config_formatting(
    tiny_model: Path, tmp_path: Path
) -> None:
    before = folder_hash(_weights(tiny_model))
    copy = Path(shutil.copytree(tiny_model, tmp_path / "renamed copy"))
    config = copy / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=4))
    assert folder_hash(_weights(copy)) == before
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert folder_hash(_weights(copy)) != before


def test_folder_source_identity_and_manifest(tiny_model: Path, tiny_engine: Path) -> None:
    source = open_model_source(tiny_model)
    assert source.kind is SourceKind.DIFFUSERS_FOLDER
    assert source.identity.name == tiny_model.name
    assert source.identity.scheme == FOLDER_HASH_SCHEME
    recorded = read_manifest(tiny_engine).source
    assert recorded["sha256"] == source.identity.sha256
    assert recorded["short_hash"] == source.identity.short
    assert recorded["kind"] == "diffusers-folder"
    assert recorded["prediction_source"] == "config"
    pipe = Pipeline.load(tiny_engine)
    assert pipe.model_hash == source.identity.short
    assert pipe.model_name == tiny_model.name


def test_prediction_type_option_overrides_the_folder(tiny_model: Path) -> None:
    source = open_model_source(tiny_model, SourceOptions(prediction_type="v_prediction"))
    assert source.prediction_type == "v_prediction"
    assert source.prediction_source == "option"
    assert source.configs["scheduler"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (SourceOptions(ema=True), "--ema applies to single-file checkpoints"),
        (SourceOptions(config_dir=Path("/tmp")), "--config applies to single-file checkpoints"),
    ],
)
def test_single_file_options_on_a_folder_are_refused(
    tiny_model: Path, options: SourceOptions, needle: str
) -> None:
    with pytest.raises(ModelFolderError, match=needle):
        open_model_source(tiny_model, options)


def test_unknown_prediction_type_is_refused() -> None:
    with pytest.raises(ModelFolderError, match="unknown prediction type 'x'; valid: epsilon, v_prediction"):
        SourceOptions(prediction_type="x")


def test_path_options_given_as_str_become_paths() -> None:
    options = SourceOptions(vae="vae.safetensors", config_dir="configs")
    assert (options.vae, options.config_dir) == (Path("vae.safetensors"), Path("configs"))
    assert SourceOptions.from_json(options.to_json()) == SourceOptions(
        vae=Path("vae.safetensors").absolute(), config_dir=Path("configs").absolute()
    )


@pytest.mark.parametrize("name", ["nothing-here", "model.txt"])
def test_missing_or_unknown_model_paths(tmp_path: Path, name: str) -> None:
    if name.endswith(".txt"):
        (tmp_path / name).write_text("not a model")
    with pytest.raises(ModelFolderError, match=str(tmp_path / name)):
        open_model_source(tmp_path / name)


def test_outdated_scheduler_config_is_migrated_and_recorded(tiny_model: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "old"))
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(
        json.dumps({**config, "_class_name": "DDIMScheduler", "clip_sample": True, "steps_offset": 0})
    )
    source = open_model_source(copy)
    assert source.configs["scheduler"]["steps_offset"] == 1
    assert source.configs["scheduler"]["clip_sample"] is False
    assert len(source.migrations) == 2
    assert source.manifest_source()["scheduler_migrations"] == list(source.migrations)


def test_malformed_scheduler_config_fails_at_export_not_at_generation(
    tiny_model: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "bad"))
    path = copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "beta_schedule": "cosine-ish"}))
    with pytest.raises(ModelFolderError, match=r"scheduler_config\.json: unknown beta_schedule 'cosine-ish'"):
        open_model_source(copy)
