"""The scheduler contract (DESIGN.md), input validation, schedules and coefficient functions.

Trajectory parity lives in test_schedulers_parity.py (diffusers) and test_schedulers_kdiffusion.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from engine import schedulers
from engine.models.presets import preset_spec
from engine.sampling import schedules
from engine.sampling.karras import lms_coefficient

SD15 = preset_spec("sd15").scheduler.config()  # SD 1.5's scheduler_config.json
REQUIRED = [
    "DDIM", "DDPM", "PNDM", "LMS", "LMS Karras", "Euler", "Euler Karras", "Euler a", "Heun", "DPM2", "DPM2 a",
    "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE", "DPM++ SDE Karras",
    "UniPC", "DEIS", "LCM", "DPM++ 2S a", "DPM++ 3M SDE", "Euler Exponential", "DPM++ 2M AYS",
]  # fmt: skip
CLASSES = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler",
]  # fmt: skip
STOCHASTIC = {"DDPM", "Euler a", "DPM2 a", "DPM++ 2M SDE", "DPM++ SDE", "LCM", "DPM++ 2S a", "DPM++ 3M SDE"}
SHAPE = (1, 4, 8, 8)


def denoiser(x, t):
    return np.tanh(0.3 * x) * math.cos(float(t) / 300.0) + 0.1 * x


def sample(sched, steps, seed=0, dtype=np.float64, strength=1.0, rng_noise=None):
    sched.set_timesteps(steps, strength)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPE) * sched.init_noise_sigma).astype(dtype)
    if strength < 1:
        x = sched.add_noise(rng.standard_normal(SHAPE).astype(dtype), x / sched.init_noise_sigma, 0)
    for i, t in enumerate(sched.timesteps):
        out = denoiser(sched.scale_model_input(x, i), t).astype(dtype)
        noise = None
        if sched.noise_steps[i] and rng_noise is not None:
            noise = rng_noise.standard_normal(SHAPE).astype(dtype)
        x = sched.step(out, i, x, noise=noise)
    return x


# ------------------------------------------------------------------------------------------ names


def test_names_cover_labels_and_classes():
    names = schedulers.names()
    assert set(REQUIRED + CLASSES) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", ["euler A", "dpm++ 2m  karras", "EULERDISCRETESCHEDULER", "lcm"])
def test_names_match_case_insensitively(name):
    assert schedulers.create(name).name.lower() == " ".join(name.lower().split())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'Euler b'; valid: DDIM, DDPM") as err:
        schedulers.create("Euler b")
    assert "\n" not in str(err.value) and "DPM++ 2M Karras" in str(err.value)


@pytest.mark.parametrize("name", REQUIRED)
def test_stochastic_flag_and_noise_steps(name):
    sched = schedulers.create(name, SD15)
    sched.set_timesteps(10)
    assert sched.stochastic == (name.removesuffix(" Karras") in STOCHASTIC)
    assert sched.noise_steps.shape == sched.timesteps.shape
    assert sched.noise_steps.any() == sched.stochastic


def test_ddim_eta_makes_it_stochastic():
    assert not schedulers.create("DDIM").stochastic
    assert schedulers.create("DDIM", eta=0.3).stochastic


def test_labels_fix_the_schedule_class_names_follow_the_config():
    karras = {**SD15, "use_karras_sigmas": True}
    assert schedulers.create("DPM++ 2M", karras).config.sigma_schedule.value == "default"
    assert schedulers.create("DPMSolverMultistepScheduler", karras).config.sigma_schedule.value == "karras"
    assert schedulers.create("Euler", SD15, use_karras_sigmas=True).config.sigma_schedule.value == "karras"


def test_config_keys_the_class_does_not_take_are_ignored():
    sched = schedulers.create("Euler", {**SD15, "set_alpha_to_one": True, "whatever": 3, "clip_sample": True})
    assert not sched.config.clip_sample  # Euler has no clip_sample: diffusers ignores it too


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"beta_schedule": "cubic"}, "unknown beta_schedule 'cubic'; valid: 'linear'"),
        ({"prediction_type": "flow"}, "unknown prediction_type 'flow'"),
        ({"timestep_spacing": "uniform"}, "unknown timestep_spacing 'uniform'"),
        ({"thresholding": True}, "thresholding=True is not supported"),
        ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one sigma schedule"),
        ({"solver_order": 4}, "solver_order must be 1, 2 or 3, got 4"),
        ({"algorithm_type": "dpmsolver"}, "unknown algorithm_type 'dpmsolver'"),
    ],
)
def test_invalid_config_values_raise(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        schedulers.create("DPMSolverMultistepScheduler", config)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", 1001])
def test_invalid_steps_raise(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.create("Euler").set_timesteps(steps)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.01, float("nan")])
def test_invalid_strength_raises(strength):
    with pytest.raises(ValueError, match="strength must be in"):
        schedulers.create("Euler").set_timesteps(10, strength)


def test_strength_that_leaves_no_step_raises():
    with pytest.raises(ValueError, match=r"strength 0\.05 leaves no steps of 10"):
        schedulers.create("DDIM").set_timesteps(10, 0.05)


def test_zero_snr_needs_a_prediction_that_can_denoise_there():
    config = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError, match="zero SNR"):
        schedulers.create("DDIM", config).set_timesteps(10)  # diffusers returns NaN here
    schedulers.create("DDIM", {**config, "prediction_type": "v_prediction"}).set_timesteps(10)


def test_timesteps_are_read_only():
    sched = schedulers.create("Euler")
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="read-only"):
        sched.timesteps[0] = 3.0


def test_lcm_steps_beyond_distillation_schedule_raise():
    with pytest.raises(ValueError, match="at most original_inference_steps=50"):
        schedulers.create("LCM").set_timesteps(51)


def test_sampling_before_set_timesteps_raises():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        _ = schedulers.create("Euler").timesteps


def test_step_index_out_of_range_raises():
    sched = schedulers.create("Euler")
    sched.set_timesteps(4)
    with pytest.raises(IndexError, match="step index 4"):
        sched.step(np.zeros(SHAPE), 4, np.zeros(SHAPE))


# ------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_sampler_without_noise_or_rng_raises(name):
    sched = schedulers.create(name, SD15)
    with pytest.raises(ValueError, match=rf"sampler '{re.escape(name)}' needs noise at step \d: pass noise="):
        sample(sched, 3)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_rng_gives_reproducible_noise(name, rng):
    seed = int(rng.integers(2**32))
    a = sample(schedulers.create(name, SD15, rng=np.random.default_rng(seed)), 6)
    b = sample(schedulers.create(name, SD15, rng=np.random.default_rng(seed)), 6)
    c = sample(schedulers.create(name, SD15, rng=np.random.default_rng(seed + 1)), 6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_noise_shape_is_checked():
    sched = schedulers.create("Euler a")
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match=r"noise shape \(1, 4\) differs from sample shape \(1, 4, 8, 8\)"):
        sched.step(np.zeros(SHAPE), 0, np.zeros(SHAPE), noise=np.zeros((1, 4)))


@pytest.mark.parametrize("name", ["Heun", "DPM++ 2M", "UniPC", "PNDM", "LMS", "DPM++ SDE"])
def test_steps_must_run_in_order(name, rng):
    sched = schedulers.create(name, SD15, rng=rng)
    sched.set_timesteps(5)
    x = np.ones(SHAPE)
    with pytest.raises(ValueError, match=r"call step for i = 0, 1, 2, \.\.\. in order"):
        for i in (0, 1, 3, 4):  # skips i = 2
            x = sched.step(denoiser(x, sched.timesteps[i]), i, x)


@pytest.mark.parametrize("name", REQUIRED)
def test_no_hidden_state_between_runs(name, rng):
    """A scheduler reused for a second run (no set_timesteps in between) gives the same result."""
    seed, noise_seed = (int(value) for value in rng.integers(2**32, size=2))
    sched = schedulers.create(name, SD15)
    first = sample(sched, 7, seed=seed, rng_noise=np.random.default_rng(noise_seed))
    sched.set_timesteps(7)
    x = np.random.default_rng(seed).standard_normal(SHAPE) * sched.init_noise_sigma
    noise_rng = np.random.default_rng(noise_seed)
    for i, t in enumerate(sched.timesteps):
        noise = noise_rng.standard_normal(SHAPE) if sched.noise_steps[i] else None
        x = sched.step(denoiser(sched.scale_model_input(x, i), t), i, x, noise=noise)
    np.testing.assert_array_equal(first, x)


@pytest.mark.parametrize("name", REQUIRED)
def test_float32_stays_float32_and_close_to_float64(name):
    out32 = sample(schedulers.create(name, SD15), 12, dtype=np.float32, rng_noise=np.random.default_rng(3))
    out64 = sample(schedulers.create(name, SD15), 12, rng_noise=np.random.default_rng(3))
    assert out32.dtype == np.float32
    assert np.abs(out32 - out64).max() / np.abs(out64).max() < 1e-4


@pytest.mark.parametrize("name", ["Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a"])
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_two_stage_samplers_evaluate_twice_per_step(name, steps):
    sched = schedulers.create(name, SD15)
    sched.set_timesteps(steps)
    assert sched.order == 2
    assert len(sched.timesteps) == 2 * steps - 1


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M Karras", "Heun", "DDIM", "UniPC"])
def test_img2img_timesteps_are_the_tail(name):
    sched = schedulers.create(name, SD15)
    sched.set_timesteps(20)
    full = sched.timesteps.copy()
    sched.set_timesteps(20, 0.6)
    assert len(sched.timesteps) == 12 * sched.order - (sched.order - 1)
    np.testing.assert_array_equal(sched.timesteps, full[len(full) - len(sched.timesteps) :])


def test_works_on_torch_tensors():
    """No numpy calls on the arrays themselves: device arrays (torch, CuPy) work as they are."""
    torch = pytest.importorskip("torch")
    for name in ("DPM++ 2M SDE Karras", "UniPC", "PNDM", "Heun", "DDIM"):
        ref = schedulers.create(name, {**SD15, "clip_sample": True})
        sched = schedulers.create(name, {**SD15, "clip_sample": True})
        expected = sample(ref, 8, rng_noise=np.random.default_rng(2))
        sched.set_timesteps(8)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(SHAPE) * sched.init_noise_sigma)
        rng = np.random.default_rng(2)
        for i, t in enumerate(sched.timesteps):
            out = torch.from_numpy(denoiser(sched.scale_model_input(x, i).numpy(), t))
            noise = torch.from_numpy(rng.standard_normal(SHAPE)) if sched.noise_steps[i] else None
            x = sched.step(out, i, x, noise=noise)
        assert isinstance(x, torch.Tensor)
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_caller_buffers_may_be_reused():
    """History keeps copies: overwriting the arrays passed to step in place changes nothing."""
    sched = schedulers.create("DPM++ 2M", SD15)
    expected = sample(sched, 6)
    sched.set_timesteps(6)
    x = np.random.default_rng(0).standard_normal(SHAPE) * sched.init_noise_sigma
    out_buffer, in_buffer = np.empty(SHAPE), np.empty(SHAPE)
    for i, t in enumerate(sched.timesteps):
        in_buffer[...] = x
        out_buffer[...] = denoiser(sched.scale_model_input(in_buffer, i), t)
        x = sched.step(out_buffer, i, in_buffer)
    np.testing.assert_array_equal(x, expected)


# -------------------------------------------------------------------------- schedules, coefficients


def test_karras_sigmas_follow_eq_5():
    sigmas = schedules.karras_sigmas(0.03, 14.6, 5)
    ramp = np.linspace(0, 1, 5)
    expected = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas, expected, rtol=1e-14)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)


def test_ays_ten_steps_are_the_published_levels():
    np.testing.assert_allclose(schedules.ays_sigmas(10), schedules.AYS_LEVELS["sd15"][:-1], rtol=1e-12)
    sigmas = schedules.ays_sigmas(25)
    assert len(sigmas) == 25 and np.all(np.diff(sigmas) < 0)
    assert sigmas[0] == pytest.approx(14.615)


def test_sigma_to_t_inverts_the_training_ladder():
    acp = schedules.alphas_cumprod(schedules_config())
    train = schedules.training_sigmas(acp)
    t = np.array([0.0, 3.25, 500.5, 998.0])
    sigmas = np.exp(np.interp(t, np.arange(1000), np.log(train)))
    np.testing.assert_allclose(schedules.sigma_to_t(sigmas, np.log(train)), t, atol=1e-9)


def schedules_config():
    from engine.sampling.config import resolve_config

    return resolve_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, (), {}, {}, {}
    )


def test_zero_snr_rescale_ends_at_zero():
    from engine.sampling.config import resolve_config

    cfg = resolve_config({"rescale_betas_zero_snr": True}, (), {}, {}, {})
    acp = schedules.alphas_cumprod(cfg)
    assert acp[-1] == 0.0
    assert schedules.alphas_cumprod(cfg, terminal_floor=True)[-1] == 2.0**-24


def _lms_sigmas():
    return np.array([14.6, 9.7, 6.1, 3.9, 2.2, 1.1, 0.4, 0.0])


@pytest.mark.parametrize(("k", "order", "j"), [(0, 1, 0), (3, 4, 0), (3, 4, 2), (6, 4, 3), (2, 3, 1)])
def test_lms_coefficients_match_gauss_legendre(k, order, j):
    sigmas = _lms_sigmas()
    nodes = [sigmas[k - m] for m in range(order)]

    def basis(tau):
        return np.prod([(tau - nodes[m]) / (nodes[j] - nodes[m]) for m in range(order) if m != j], axis=0)

    x, w = np.polynomial.legendre.leggauss(4)  # exact for the cubic Lagrange basis
    a, b = sigmas[k], sigmas[k + 1]
    expected = 0.5 * (b - a) * np.sum(w * basis(0.5 * (b - a) * x + 0.5 * (a + b)))
    assert lms_coefficient(sigmas, k, order, j) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_lms_coefficients_match_scipy_quad_like_diffusers():
    integrate = pytest.importorskip("scipy.integrate")
    sigmas = _lms_sigmas()
    for k in range(len(sigmas) - 1):
        order = min(k + 1, 4)
        for j in range(order):

            def basis(tau, j=j, k=k, order=order):
                prod = 1.0
                for m in range(order):
                    if m != j:
                        prod *= (tau - sigmas[k - m]) / (sigmas[k - j] - sigmas[k - m])
                return prod

            expected = integrate.quad(basis, sigmas[k], sigmas[k + 1], epsrel=1e-10)[0]
            assert lms_coefficient(sigmas, k, order, j) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_dpmpp_sde_noise_has_the_brownian_tree_law():
    """diffusers' DPM++ SDE asks a Brownian tree for W over [s, mid] and then over [s, s_next]
    (normalised). We get two independent normals instead; the second is mixed from both. The pair
    must have the tree's joint law: unit variances and correlation sqrt((s - mid) / (s - s_next))."""
    sched = schedulers.create("DPM++ SDE", SD15)
    sched.set_timesteps(6)
    second = sched.plan.updates[3]  # second evaluation of step 1
    weights = {t.lag: t.coef for t in second.out if t.source.value == "noise"}
    up = math.hypot(weights[0], weights[1])
    s, mid = np.sqrt(1 / sched.plan.input_scale[2:4] ** 2 - 1)
    s_next = np.sqrt(1 / sched.plan.input_scale[4] ** 2 - 1)

    rng = np.random.default_rng(0)
    n = 100_000
    n1, n2 = rng.standard_normal(n), rng.standard_normal(n)
    ours = np.stack([n1, (weights[1] * n1 + weights[0] * n2) / up])

    # An independent Brownian path on a fine grid from s down to s_next, queried like diffusers.
    grid = np.concatenate([np.linspace(s, mid, 17), np.linspace(mid, s_next, 17)[1:]])
    steps = rng.standard_normal((n, len(grid) - 1)) * np.sqrt(-np.diff(grid))
    w = np.concatenate([np.zeros((n, 1)), np.cumsum(steps, axis=1)], axis=1)
    tree = np.stack([w[:, 16] / math.sqrt(s - mid), w[:, -1] / math.sqrt(s - s_next)])

    rho = math.sqrt((s - mid) / (s - s_next))
    for pair in (ours, tree):
        cov = np.cov(pair)
        np.testing.assert_allclose(np.diag(cov), [1.0, 1.0], atol=0.02)
        assert cov[0, 1] == pytest.approx(rho, abs=0.02)
    assert abs(np.corrcoef(n2, n1)[0, 1]) < 0.01  # the inputs are independent, the outputs are not
