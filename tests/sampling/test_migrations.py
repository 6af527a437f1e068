"""Outdated scheduler configs: migrate_scheduler_config against diffusers' StableDiffusionPipeline.

The reference is the pipeline itself: each config becomes a diffusers scheduler, the pipeline is
built around it (no networks needed), and the scheduler config the pipeline keeps is what our
migration must give, key by key, with class defaults for keys the file leaves out. Then the
NumPy samplers on the migrated config follow diffusers' migrated scheduler step for step, while on
the raw config they do not (the 15.7 dB image of the report).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from engine import schedulers  # noqa: E402
from engine.models.presets import preset_spec  # noqa: E402
from engine.sampling.config import migrate_scheduler_config  # noqa: E402
from engine.sampling.registry import CLASSES, DEFAULTS  # noqa: E402
from tests.sampling.test_schedulers_parity import (  # noqa: E402
    SHAPE,
    float32_normals,
    relative_max_error,
    run_diffusers,
    run_ours,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# SD 1.5's scheduler settings as old folders wrote them: no spacing or prediction keys, and none of
# the two the migrations change (the kinds below set them).
_OLD_KEYS = (
    "beta_start",
    "beta_end",
    "beta_schedule",
    "num_train_timesteps",
    "set_alpha_to_one",
    "skip_prk_steps",
)
SD = {key: preset_spec("sd15").scheduler.config()[key] for key in (*_OLD_KEYS, "trained_betas")}
# The kinds of outdated configs found in model folders: (name, scheduler_config.json).
KINDS = {
    "ddim-clip-offset0": {"_class_name": "DDIMScheduler", **SD, "clip_sample": True, "steps_offset": 0},
    "ddim-keys-unset": {"_class_name": "DDIMScheduler", **SD},  # class defaults: offset 0, clip true
    "ddpm-clip": {"_class_name": "DDPMScheduler", **SD, "clip_sample": True, "steps_offset": 1},
    "pndm-offset0": {"_class_name": "PNDMScheduler", **SD, "steps_offset": 0},
    "pndm-offset-unset": {"_class_name": "PNDMScheduler", **SD},
    "pndm-clip-kept-key": {"_class_name": "PNDMScheduler", **SD, "clip_sample": True, "steps_offset": 1},
    "euler-offset2": {"_class_name": "EulerDiscreteScheduler", **SD, "steps_offset": 2},
    "lms-offset0-clip-false": {"_class_name": "LMSDiscreteScheduler", **SD, "steps_offset": 0,
                               "clip_sample": False},
    "heun-clip-unset": {"_class_name": "HeunDiscreteScheduler", **SD, "steps_offset": 1},  # default false
    "lcm-unset": {"_class_name": "LCMScheduler", **SD},
    "dpm-v-offset0": {"_class_name": "DPMSolverMultistepScheduler", **SD, "steps_offset": 0,
                      "prediction_type": "v_prediction"},
    "singlestep-unknown-class": {"_class_name": "DPMSolverSinglestepScheduler", **SD, "clip_sample": True},
    "current-sd15": {"_class_name": "PNDMScheduler", **SD, "steps_offset": 1, "clip_sample": False},
    "current-ddim-v": {"_class_name": "DDIMScheduler", **SD, "steps_offset": 1, "clip_sample": False,
                       "prediction_type": "v_prediction"},
}  # fmt: skip
KEYS = ("steps_offset", "clip_sample")


def pipeline_scheduler(config: dict):
    """(the scheduler's config before, after) StableDiffusionPipeline.__init__ migrated it in place."""
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    before = dict(sched.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    return before, pipe.scheduler


def effective(config: dict, key: str):
    """A key's value as a diffusers scheduler of the config's class sees it (missing: class default)."""
    algorithm = CLASSES.get(config.get("_class_name"))
    return config.get(key, DEFAULTS[algorithm].get(key) if algorithm is not None else None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_migration_matches_the_pipeline(kind):
    config = KINDS[kind]
    migrated, notes = migrate_scheduler_config(config)
    before, after = pipeline_scheduler(config)
    changed = [key for key in KEYS if before.get(key) != after.config.get(key)]
    assert [note.split(":")[0] for note in notes] == [f"scheduler {key}" for key in changed]
    for key in KEYS:
        assert effective(migrated, key) == after.config.get(key), key
    for key, note in zip(changed, notes, strict=True):
        old, new = json.dumps(before[key]), json.dumps(after.config[key])
        assert f"{old} -> {new}" in note or f"default {old}) -> {new}" in note
        assert "StableDiffusionPipeline" in note and "\n" not in note
    assert {k: v for k, v in migrated.items() if k not in changed} == {
        k: v for k, v in config.items() if k not in changed
    }


def test_migration_does_not_change_its_input():
    config = dict(KINDS["ddim-clip-offset0"])
    migrated, notes = migrate_scheduler_config(config)
    assert config == KINDS["ddim-clip-offset0"] and migrated is not config
    assert migrated["steps_offset"] == 1 and migrated["clip_sample"] is False and len(notes) == 2
    assert migrate_scheduler_config(migrated) == (migrated, ())


def test_config_without_a_class_migrates_the_keys_it_sets():
    assert migrate_scheduler_config({**SD, "steps_offset": 0})[0]["steps_offset"] == 1
    assert migrate_scheduler_config(SD) == (SD, ())


# label -> (diffusers class swapped in from the pipeline's config, how diffusers draws noise)
SAMPLERS = {
    "DDIM": ("DDIMScheduler", None),
    "PNDM": ("PNDMScheduler", None),
    "Euler": ("EulerDiscreteScheduler", None),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", None),
    "DDPM": ("DDPMScheduler", "generator"),
}


def trajectories(label: str, our_config: dict, ref_config: dict, steps: int, strength: float):
    cls_name, noise_mode = SAMPLERS[label]
    ref_sched = getattr(diffusers, cls_name).from_config(ref_config)
    rng = np.random.default_rng(steps)
    x_t, image = rng.standard_normal(SHAPE), 0.8 * rng.standard_normal(SHAPE)
    ours = schedulers.create(label, our_config)
    ours.set_timesteps(steps, strength)
    noises = float32_normals(len(ours.timesteps), steps)
    ref, _, _ = run_diffusers(ref_sched, steps, strength, x_t, image, noise_mode, noises)
    return run_ours(ours, steps, strength, x_t, image, None), ref


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("label", list(SAMPLERS))
@pytest.mark.parametrize("kind", ["ddim-clip-offset0", "ddim-keys-unset", "pndm-offset0", "dpm-v-offset0"])
def test_samplers_on_the_migrated_config_match_the_pipeline(kind, label, strength):
    """The migrated config, sampled by any sampler, gives diffusers' pipeline trajectory; for DDIM on
    the report's config the raw one does not.

    The reference swaps the class in as diffusers users do, ``Class.from_config(pipe.scheduler
    .config)``, which takes the new class's defaults for the keys the file left unset (they are
    listed in ``_use_default_values``) - except for the keys the pipeline migrated: diffusers drops
    those too and falls back to steps_offset 0 / clip_sample true, an accident of the list the
    migration leaves stale. The engine keeps the migrated values for every sampler.
    """
    before, pipe_sched = pipeline_scheduler(KINDS[kind])
    migrated, _ = migrate_scheduler_config(KINDS[kind])
    ref_config = dict(pipe_sched.config)
    changed = {key for key in KEYS if before.get(key) != ref_config.get(key)}
    ref_config["_use_default_values"] = [k for k in ref_config["_use_default_values"] if k not in changed]
    out, ref = trajectories(label, migrated, ref_config, 25, strength)
    assert relative_max_error(out, ref) <= 1e-4
    if kind == "ddim-clip-offset0" and label == "DDIM":
        raw, _ = trajectories(label, KINDS[kind], ref_config, 25, strength)
        assert relative_max_error(raw, ref) > 1e-2
