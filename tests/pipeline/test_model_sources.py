"""Models as people have them, end to end: exported, generated, and compared with diffusers.

One SD 1 export carries the usual mix at once, to keep CI short (a tiny UNet export takes most of a
minute): an fp16 single-file checkpoint in the LDM layout (tests/models/ldm.py), a swapped-in VAE and
an outdated DDIM scheduler config (``clip_sample: true``, ``steps_offset: 0``) in its ``--config``
folder. diffusers' ``from_single_file(config=...)`` with the same VAE is the reference; its
StableDiffusionPipeline migrates the scheduler config as the engine must. An SD 2 v-prediction
checkpoint (prediction type from the .yaml beside it) is the second export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from engine import Pipeline
from engine.export import ExportSettings, export_model
from engine.infotext import format_infotext
from engine.manifest import Manifest, read_manifest
from engine.models.presets import init_random
from engine.models.source import SourceOptions, open_model_source
from engine.pipeline import GenerationRequest
from engine.sampling.registry import lookup
from engine.specs import Network
from engine.text.chunks import chunk_prompt
from tests.models.ldm import write_checkpoint
from tests.prefetch import prefetched
from tests.reference import generators, psnr

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry"
# txt2img needs these three: fewer graphs to export and gate keeps the tests quick.
TXT2IMG = ExportSettings(networks=(Network.TEXT_ENCODER, Network.UNET, Network.VAE_DECODER))


def reference_pipeline(path: Path, config: Path, sampler: str, vae: Path | None = None):
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    if vae is not None:
        pipe.vae = diffusers.AutoencoderKL.from_pretrained(vae)
    entry = lookup(sampler)
    pipe.scheduler = getattr(diffusers, entry.diffusers_class).from_config(
        pipe.scheduler.config, **dict(entry.forced)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, seed: int):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, width=64, height=64,
                generator=generators(seed, 1), output_type="np").images[0]  # fmt: skip


def our_image(engine: Path, sampler: str, seed: int):
    return Pipeline.load(engine).generate(
        PROMPT, NEGATIVE, steps=6, width=64, height=64, sampler=sampler, seed=seed
    )


@dataclass(frozen=True)
class Sd1Export:
    """The SD 1 export and what went into it (all in the folder :func:`build_sd1_export` wrote)."""

    config: Path  # --config folder, with the outdated DDIM scheduler config
    vae: Path  # --vae: another tiny model's VAE folder
    checkpoint: Path
    engine: Path
    manifest: Manifest
    warnings: list[str]  # what export logged at WARNING

    @staticmethod
    def read(root: Path) -> Sd1Export:
        return Sd1Export(
            config=root / "config",
            vae=root / "other" / "vae",
            checkpoint=root / "dreamy-v2.safetensors",
            engine=root / "engine",
            manifest=read_manifest(root / "engine"),
            warnings=json.loads((root / "warnings.json").read_text()),
        )


class _Keep(logging.Handler):
    """Collects log records (a module-scoped fixture cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def build_sd1_export(root: Path) -> None:
    """The files of :class:`Sd1Export` in ``root``: the tiny model (as ``tiny_model``: same preset and
    seed) as an fp16 checkpoint, its config folder with an outdated DDIM config, another VAE, and the
    export. Usually built in the background while other tests run (tests/prefetch.py)."""
    tiny = init_random("tiny", root / "tiny", seed=0)
    config = Path(shutil.copytree(tiny, root / "config"))
    path = config / "scheduler" / "scheduler_config.json"
    outdated = {"_class_name": "DDIMScheduler", "clip_sample": True, "steps_offset": 0}
    path.write_text(json.dumps({**json.loads(path.read_text()), **outdated}))
    vae = init_random("tiny", root / "other", seed=7) / "vae"
    checkpoint = write_checkpoint(tiny, root / "dreamy-v2.safetensors", dtype=torch.float16)
    keep = _Keep()
    logging.getLogger().addHandler(keep)
    try:
        options = SourceOptions(config_dir=config, vae=vae)
        export_model(checkpoint, root / "engine", TXT2IMG, options=options)
    finally:
        logging.getLogger().removeHandler(keep)
    (root / "warnings.json").write_text(json.dumps(keep.lines))


@pytest.fixture(scope="module")
def sd1_export(request: pytest.FixtureRequest) -> Sd1Export:
    return Sd1Export.read(prefetched(request))


def test_sd1_fp16_checkpoint_with_vae_swap_and_old_ddim_config_matches_diffusers(
    sd1_export: Sd1Export,
) -> None:
    sd1 = sd1_export
    ours = our_image(sd1.engine, "DDIM", seed=21)
    reference = reference_image(reference_pipeline(sd1.checkpoint, sd1.config, "DDIM", vae=sd1.vae), seed=21)
    assert psnr(ours.images[0], reference) >= 40
    own_vae = reference_image(reference_pipeline(sd1.checkpoint, sd1.config, "DDIM"), seed=21)
    assert psnr(ours.images[0], own_vae) < 40  # the swap changed the picture


def test_outdated_scheduler_config_is_migrated_with_one_warning_each(sd1_export: Sd1Export) -> None:
    manifest = sd1_export.manifest
    assert manifest.scheduler_config["steps_offset"] == 1
    assert manifest.scheduler_config["clip_sample"] is False
    migrations = manifest.source["scheduler_migrations"]
    assert len(migrations) == 2 and sd1_export.warnings == migrations


def test_manifest_and_infotext_carry_the_a1111_identity(sd1_export: Sd1Export) -> None:
    source = sd1_export.manifest.source
    sha256 = hashlib.sha256(sd1_export.checkpoint.read_bytes()).hexdigest()
    assert (source["kind"], source["sha256"], source["prediction_source"]) == (
        "single-file",
        sha256,
        "config_dir",
    )
    vae_weights = sd1_export.vae / "diffusion_pytorch_model.safetensors"
    vae_hash = hashlib.sha256(vae_weights.read_bytes()).hexdigest()[:10]
    result = Pipeline.load(sd1_export.engine).generate(PROMPT, steps=1, width=64, height=64, seed=1)
    infotext = format_infotext({**result.parameters, "seed": 1})
    assert f"Model hash: {sha256[:10]}, Model: dreamy-v2, VAE hash: {vae_hash}, VAE: other" in infotext


@pytest.mark.slow  # 100 s (two tiny exports and diffusers runs): keeps CI under 15 minutes on 2 cores
def test_sd2_v_prediction_checkpoint_from_its_yaml(tiny_v_model: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_v_model, tmp_path / "sd2-v.safetensors", dtype=torch.float16)
    checkpoint.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    options = SourceOptions(config_dir=tiny_v_model)
    manifest = export_model(checkpoint, tmp_path / "engine", TXT2IMG, options=options).manifest
    assert (manifest.prediction_type, manifest.source["prediction_source"]) == ("v_prediction", "yaml")
    ours = our_image(tmp_path / "engine", "Euler a", seed=5)
    assert (
        psnr(ours.images[0], reference_image(reference_pipeline(checkpoint, tiny_v_model, "Euler a"), 5))
        >= 40
    )
    assert "Prediction type: v_prediction" in format_infotext({**ours.parameters, "seed": 5})


def test_marker_key_selects_v_prediction_and_the_option_wins(tiny_v_model: Path, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tiny_v_model, tmp_path / "marked.safetensors", markers=("v_pred",))
    found = open_model_source(checkpoint, SourceOptions(config_dir=tiny_v_model))
    assert (found.prediction_type, found.prediction_source) == ("v_prediction", "marker v_pred")
    forced = open_model_source(checkpoint, SourceOptions(config_dir=tiny_v_model, prediction_type="epsilon"))
    assert (forced.prediction_type, forced.prediction_source) == ("epsilon", "option")
    assert forced.configs["scheduler"]["prediction_type"] == "epsilon"


def test_vae_swap_on_a_folder_loads_the_other_vae(tiny_model: Path, tmp_path: Path) -> None:
    other = init_random("tiny", tmp_path / "other", seed=7) / "vae"
    source = open_model_source(tiny_model, SourceOptions(vae=other))
    loaded = source.load().vae.state_dict()
    expected = diffusers.AutoencoderKL.from_pretrained(other).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert source.vae_identity is not None and source.vae_identity.name == "other"  # other/vae
    assert "vae" not in source.manifest_source()["weights"]  # the folder's own VAE was not read


def test_prompt_longer_than_clip_reads_is_chunked_not_cut(tiny_engine: Path) -> None:
    """A prompt past 75 tokens makes more 75-token chunks, encoded alone and joined (A1111's long
    prompts): the UNet sees 77 positions per chunk and the words past the 75th count (two prompts that
    share their first 75 tokens give different images)."""
    pipe = Pipeline.load(tiny_engine)
    castles = " ".join(["castle"] * 80)
    river, lake = f"{castles} by the river", f"{castles} by the lake"
    tokens = [pipe.tokenizer.encode_unpadded(text) for text in (river, lake)]
    assert tokens[0][:75] == tokens[1][:75] and tokens[0] != tokens[1]
    chunks = chunk_prompt(river, pipe.tokenizer).count
    assert chunks >= 2
    request = GenerationRequest.create(river, steps=1, width=64, height=64, seed=1)
    assert pipe.encode_prompts(request).shape == (2, 77 * chunks, 32)  # the negative padded to match
    settings = {"steps": 1, "width": 64, "height": 64, "seed": 1}
    images = [np.asarray(pipe.generate(text, **settings).images[0]) for text in (river, lake)]
    assert not np.array_equal(*images)
