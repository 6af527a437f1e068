"""Every sampler at every accepted step count (1..1000) on every scheduler config people ship:
it runs (finite tables, a finite first step) or refuses in one line before building anything.

Three layers, cheapest first: the integer timestep spacings at all of 1..1000; each sampler's verdict
(``allowed_steps``) at all of 1..1000 against the documented exceptions; and real ``set_timesteps``
plus one ``step`` on random arrays at a sample of counts: the small ones, a log-uniform draw, one of
the counts where diffusers' trailing spacing makes an extra timestep, and 999 / 1000 on the standard
SD config (the reported IndexError). Draws come from the ``rng`` fixture (replay with its seed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import schedulers
from engine.errors import RequestError
from engine.sampling import schedules
from engine.sampling.config import Spacing
from engine.sampling.discrete import pndm_timesteps
from engine.sampling.registry import Algorithm
from engine.sampling.steps import describe_counts

N = 1000
ALL = tuple(range(1, N + 1))
SD = {  # runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1-base scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": N,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
V = {**SD, "prediction_type": "v_prediction"}
ZSNR = {**V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}  # a `ztsnr` checkpoint
CONFIGS = {
    "sd": SD,
    "sd-v": V,
    "ddim-outdated": {**SD, "_class_name": "DDIMScheduler", "clip_sample": True, "steps_offset": 0,
                      "set_alpha_to_one": True},
    "trailing": {**SD, "timestep_spacing": "trailing"},
    "linspace": {**SD, "timestep_spacing": "linspace", "steps_offset": 0},
    "leading-offset-0": {**SD, "steps_offset": 0},
    "zsnr": ZSNR,
    "zsnr-leading": {**V, "rescale_betas_zero_snr": True},
    "karras-v": {**V, "use_karras_sigmas": True},
    "exponential": {**SD, "use_exponential_sigmas": True},
    "prk": {**SD, "skip_prk_steps": False},
    "class-defaults": {},
    "zsnr-epsilon": {**ZSNR, "prediction_type": "epsilon"},  # a broken config: refusals
}  # fmt: skip
NAMES = schedulers.names()
SHAPE = (1, 4, 2, 2)
# The counts where np.arange(1000, 0, -1000 / steps) has steps + 1 entries (diffusers' trailing spacing).
TRAILING_EXTRA = tuple(s for s in ALL if len(np.arange(N, 0, -N / s)) != s)


def expected_allowed(sched: schedulers.Scheduler) -> tuple[int, ...]:
    """The documented exceptions (sampling/steps.py), written out independently."""
    cfg, algorithm = sched.config, sched.sampler.algorithm
    zero_snr_eps = cfg.rescale_betas_zero_snr and cfg.prediction_type.value == "epsilon"
    if algorithm is Algorithm.LCM:
        return () if zero_snr_eps else tuple(range(1, cfg.original_inference_steps + 1))
    if algorithm in (Algorithm.DDIM, Algorithm.DDPM) and zero_snr_eps:
        assert cfg.timestep_spacing is Spacing.TRAILING  # every count reaches timestep 999
        return ()
    if algorithm is Algorithm.PNDM and not cfg.skip_prk_steps:
        return tuple(range(4, N + 1))
    return ALL


# ------------------------------------------------------------------------- integer timestep spacings


@pytest.mark.parametrize("spacing", list(Spacing))
@pytest.mark.parametrize("offset", [0, 1])
def test_spacings_give_distinct_training_timesteps_at_every_count(spacing, offset):
    for steps in ALL:
        ladders = {
            "discrete": schedules.discrete_timesteps(spacing, N, steps, offset),
            "sigma": schedules.sigma_timesteps(spacing, N, steps, offset, np.float32),
            "multistep": schedules.multistep_timesteps(spacing, N, steps, offset, N),
        }
        for kind, ts in ladders.items():
            where = f"{kind} {spacing.value} offset {offset}, {steps} steps"
            assert len(ts) == steps, where
            assert ts.min() >= 0 and ts.max() <= N - 1, where
            assert np.all(np.diff(ts) < 0), where


def test_leading_offset_only_moves_where_it_would_leave_the_table():
    """steps_offset 1 stays wherever diffusers' ladder fits; at 1000 steps the ladder is 999..0."""
    for steps in ALL:
        ts = schedules.discrete_timesteps(Spacing.LEADING, N, steps, 1)
        if steps < N:
            np.testing.assert_array_equal(ts, np.arange(steps)[::-1] * (N // steps) + 1)
    np.testing.assert_array_equal(schedules.discrete_timesteps(Spacing.LEADING, N, N, 1), np.arange(N)[::-1])


@pytest.mark.parametrize("prk", [False, True])
@pytest.mark.parametrize("spacing", list(Spacing))
def test_pndm_timesteps_stay_in_the_table(spacing, prk):
    cfg = schedulers.create(
        "PNDM", {**SD, "timestep_spacing": spacing.value, "skip_prk_steps": not prk}
    ).config
    for steps in range(4 if prk else 1, N + 1):
        ts, _ = pndm_timesteps(cfg, steps)
        assert ts.min() >= 0 and ts.max() <= N - 1, steps


# ------------------------------------------------------------------------ verdicts at every count


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_every_sampler_allows_every_count_but_the_documented_ones(config_name):
    for name in NAMES:
        sched = schedulers.create(name, CONFIGS[config_name])
        assert sched.allowed_steps() == expected_allowed(sched), name


def test_describe_counts():
    assert describe_counts(ALL) == "1..1000"
    assert describe_counts([1, 2, 3, 5, 7, 8]) == "1..3, 5, 7..8"
    assert describe_counts([]) == "none"


def test_refusal_is_one_line_naming_sampler_count_and_range():
    sched = schedulers.create("LCM", SD)
    with pytest.raises(RequestError) as err:
        sched.set_timesteps(1000)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("sampler 'LCM' cannot run 1000 steps")
    assert message.endswith("allowed steps: 1..50")
    with pytest.raises(RequestError, match=r"allowed steps: 4\.\.1000$"):
        schedulers.create("PNDM", {**SD, "skip_prk_steps": False}).set_timesteps(3)
    with pytest.raises(RequestError, match=r"zero SNR needs v_prediction\); allowed steps: none$"):
        schedulers.create("DDIM", CONFIGS["zsnr-epsilon"]).set_timesteps(20)


def test_zero_snr_epsilon_refuses_only_the_counts_that_reach_the_zero_snr_timestep():
    """With leading spacing and steps_offset 1 the ladder tops out at 999 only at 500, 999 and 1000."""
    sched = schedulers.create("DDIM", {**SD, "rescale_betas_zero_snr": True})
    assert describe_counts(sched.allowed_steps()) == "1..499, 501..998"
    sched.set_timesteps(20)
    with pytest.raises(RequestError, match=r"allowed steps: 1\.\.499, 501\.\.998$"):
        sched.set_timesteps(500)


def test_clipped_lambda_ladders_refuse_counts_without_distinct_timesteps():
    """DPM-Solver's lambda_min_clipped (cosine schedules) leaves too few timesteps for high counts."""
    config = {
        "beta_schedule": "squaredcos_cap_v2",
        "lambda_min_clipped": -5.1,
        "prediction_type": "v_prediction",
    }
    for spacing, allowed in (("trailing", "1..222"), ("leading", "1..995"), ("linspace", "1..995")):
        sched = schedulers.create("DPM++ 2M", {**config, "timestep_spacing": spacing})
        assert describe_counts(sched.allowed_steps()) == allowed, spacing
        run_one_step(sched, int(allowed.split("..")[1]), 1.0, np.random.default_rng(0))


# -------------------------------------------------------------------- set_timesteps plus one step


def run_one_step(sched: schedulers.Scheduler, steps: int, strength: float, rng: np.random.Generator) -> None:
    sched.set_timesteps(steps, strength)
    plan = sched.plan
    assert len(plan.timesteps) > 0
    assert np.all(np.isfinite(plan.timesteps)) and np.all(np.isfinite(plan.input_scale))
    noise = rng.standard_normal(SHAPE)
    x = (
        sched.add_noise(rng.standard_normal(SHAPE), noise, 0)
        if strength < 1
        else noise * sched.init_noise_sigma
    )
    model_in = sched.scale_model_input(x, 0)
    noise = rng.standard_normal(SHAPE) if sched.noise_steps[0] else None
    out = sched.step(np.tanh(model_in), 0, x, noise=noise)
    assert np.all(np.isfinite(out)), f"{sched.name}: {steps} steps, strength {strength}"


def check_count(name: str, config: dict, steps: int, strength: float, rng: np.random.Generator) -> None:
    sched = schedulers.create(name, config)
    allowed = expected_allowed(sched)
    if steps in allowed:
        run_one_step(sched, steps, strength, rng)
        return
    with pytest.raises(RequestError) as err:
        sched.set_timesteps(steps, strength)
    message = str(err.value)
    assert "\n" not in message and f"sampler {sched.name!r} cannot run {steps} steps" in message
    assert message.endswith(f"allowed steps: {describe_counts(allowed)}")
    assert sched._plan is None  # refused before building anything


def draw_strength(rng: np.random.Generator, steps: int) -> float:
    """1.0 half the time, else a strength that keeps at least one step."""
    if steps == 1 or rng.random() < 0.5:
        return 1.0
    return float(rng.uniform(1.0001 / steps, 1.0))


def distinct_samplers(config: dict) -> list[str]:
    """One name per distinct (algorithm, resolved config): class names repeat labels on most configs."""
    seen, names = set(), []
    for name in NAMES:
        sched = schedulers.create(name, config)
        if (key := (sched.sampler.algorithm, sched.config)) not in seen:
            seen.add(key)
            names.append(name)
    return names


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_every_sampler_runs_or_refuses_sampled_counts(config_name, rng):
    """Counts 1..4, one in 5..60 and one high count (log-uniform in 61..1000, or on trailing configs
    one where diffusers adds a timestep), each at strength 1 or a random img2img strength."""
    config = CONFIGS[config_name]
    trailing = schedulers.create("DDIM", config).config.timestep_spacing is Spacing.TRAILING
    for name in distinct_samplers(config):
        log_uniform = math.exp(rng.uniform(math.log(61), math.log(N)))
        high = int(rng.choice(TRAILING_EXTRA) if trailing else log_uniform)
        for steps in (1, 2, 3, 4, int(rng.integers(5, 61)), high):
            check_count(name, config, steps, draw_strength(rng, steps), rng)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_refusals_name_each_sampler(config_name):
    """Refusals cost nothing: every name, at every count its verdict refuses among a spread of counts."""
    for name in NAMES:
        sched = schedulers.create(name, CONFIGS[config_name])
        refused = sorted(set(ALL) - set(expected_allowed(sched)))
        for steps in refused[:2] + refused[-1:]:
            check_count(name, CONFIGS[config_name], steps, 1.0, np.random.default_rng(0))


def test_every_sampler_at_a_thousand_steps_on_the_sd_config(rng):
    """The reported case: `--sampler DDIM --steps 1000` on SD 1.x/2.x (leading, steps_offset 1)."""
    for name in distinct_samplers(SD):
        check_count(name, SD, N, 1.0, rng)


def test_multistep_samplers_at_999_steps_on_the_sd_config(rng):
    """diffusers' multistep ladder starts at timestep 1000 here (its sigma repeats: NaN)."""
    for name in ("DPM++ 2M", "DPM++ 2M SDE", "UniPC", "DEIS", "DPMSolverMultistepScheduler"):
        check_count(name, SD, 999, 1.0, rng)
        assert schedulers.create(name, SD).allowed_steps() == ALL


@pytest.mark.parametrize("name", ["DDIM", "DDPM", "PNDM"])
def test_a_thousand_steps_run_every_training_timestep_to_the_end(name, rng):
    sched = schedulers.create(name, SD)
    sched.set_timesteps(N)
    assert sched.timesteps[0] == N - 1 and sched.timesteps[-1] == 0
    x = rng.standard_normal(SHAPE)
    for i in range(len(sched.timesteps)):
        noise = rng.standard_normal(SHAPE) if sched.noise_steps[i] else None
        x = sched.step(0.9 * x, i, x, noise=noise)
    assert np.all(np.isfinite(x))


# ------------------------------------------------------------- where diffusers fails, what runs here


@pytest.fixture(scope="module")
def diffusers_module():
    return pytest.importorskip("diffusers")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_trailing_counts_drop_only_diffusers_extra_timestep(diffusers_module, rng):
    """diffusers makes steps + 1 timesteps here, the last one -1; the first `steps` are ours."""
    config = {**ZSNR}
    for steps in rng.choice(TRAILING_EXTRA, 5, replace=False):
        ref = diffusers_module.DDIMScheduler.from_config(config)
        ref.set_timesteps(int(steps))
        assert len(ref.timesteps) == steps + 1 and int(ref.timesteps[-1]) == -1
        for name in ("DDIM", "Euler", "DPM++ 2M"):
            ours = schedulers.create(name, config)
            ours.set_timesteps(int(steps))
            np.testing.assert_array_equal(ours.timesteps.astype(np.int64), ref.timesteps.numpy()[:-1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_where_diffusers_crashes_at_a_thousand_steps(diffusers_module):
    ref = diffusers_module.DDIMScheduler.from_config(SD)
    ref.set_timesteps(N)
    assert int(ref.timesteps[0]) == N  # alpha_bar[1000]: IndexError in step()
    for name in ("DDIM", "DPM++ 2M", "Euler"):
        ours = schedulers.create(name, SD)
        ours.set_timesteps(N)
        np.testing.assert_array_equal(ours.timesteps.astype(np.int64), np.arange(N)[::-1])
