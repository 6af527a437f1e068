"""The torch backends' one loader of the source model named in an engine folder's manifest, and the
meta-device builder every config check uses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from engine.errors import EngineFolderError, ModelFolderError
from engine.manifest import read_manifest
from engine.models.presets import preset_spec
from engine.models.torch_modules import load_source_from_manifest, meta_module


def test_loads_the_folder_the_manifest_names(tiny_engine: Path, tiny_model: Path) -> None:
    manifest = read_manifest(tiny_engine)
    assert Path(manifest.source["model_dir"]).resolve() == tiny_model.resolve()
    source = load_source_from_manifest(manifest)
    reference = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    for (name, ours), (_, theirs) in zip(
        source.unet.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model_dir", [None, "/nonexistent/sd-engine-source"])
def test_missing_source_folder_is_one_line(tiny_engine: Path, model_dir: str | None) -> None:
    manifest = read_manifest(tiny_engine)
    source = {} if model_dir is None else {"model_dir": model_dir}
    pattern = r"source model .* named in the manifest: not found"
    with pytest.raises(EngineFolderError, match=pattern) as info:
        load_source_from_manifest(dataclasses.replace(manifest, source=source))
    assert "\n" not in str(info.value)


def test_meta_module_builds_without_memory_and_refuses_bad_configs_in_one_line() -> None:
    unet = meta_module("unet", preset_spec("sd15").unet.config())
    assert all(t.is_meta for t in unet.state_dict().values())
    with pytest.raises(ModelFolderError, match=r"^vae config is not valid: ") as info:
        meta_module("vae", {"block_out_channels": 4})
    assert "\n" not in str(info.value)
