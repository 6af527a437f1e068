"""Full trajectories of every sampler against its diffusers counterpart, element-wise.

Both sides run the same deterministic fake denoiser (nonlinear in sample and timestep) on the same
initial noise and the same injected noise. diffusers runs "in float64 where it allows": its
alpha_bar is rebuilt in float64 and its sigma tables are widened to float64 after set_timesteps
(values unchanged), and samples are float64. Euler, Euler a and DPM-Solver multistep still round
the sample to float32 inside ``step``; they get the float32 tolerance.

Noise: ancestral samplers draw from a torch generator in diffusers; we feed our sampler the same
draws from an identically seeded generator wherever ``noise_steps`` is set, which also checks that
``noise_steps`` marks exactly the steps where diffusers draws. DPMSolverSDEScheduler needs torchsde's
Brownian tree; torchsde is not installed, so a stand-in tree walks a Brownian path built from the
same normals our sampler receives (see ``BrownianPath``).
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr  # noqa: E402

from engine import schedulers  # noqa: E402

# diffusers 0.42 calls numpy on torch tensors (NumPy 2 deprecations), hundreds of thousands of times.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21V = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}  # class defaults otherwise
ZERO_SNR = {**SD21V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
COSINE = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "linspace"}
CONFIGS = {"sd15": SD15, "sd21v": SD21V, "linear": LINEAR, "zsnr": ZERO_SNR, "cosine": COSINE}

# label -> (diffusers class, from_config kwargs, how diffusers gets its noise)
CASES = {
    "DDIM": ("DDIMScheduler", {}, None),
    "DDPM": ("DDPMScheduler", {}, "generator"),
    "PNDM": ("PNDMScheduler", {}, None),
    "LMS": ("LMSDiscreteScheduler", {}, None),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, None),
    "Euler": ("EulerDiscreteScheduler", {}, None),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, None),
    "Euler Exponential": ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, None),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, "generator"),
    "Heun": ("HeunDiscreteScheduler", {}, None),
    "Heun Karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, None),
    "DPM2": ("KDPM2DiscreteScheduler", {}, None),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, None),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, "generator"),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, "generator"),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}, None),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, None),
    "DPM++ 2M Exponential": ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, None),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "variance"),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        "variance",
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}, "tree"),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "tree"),
    "UniPC": ("UniPCMultistepScheduler", {}, None),
    "UniPC Karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, None),
    "DEIS": ("DEISMultistepScheduler", {}, None),
    "DEIS Karras": ("DEISMultistepScheduler", {"use_karras_sigmas": True}, None),
    "LCM": ("LCMScheduler", {}, "generator"),
}
# diffusers classes that raise NotImplementedError for prediction_type "sample"
NO_SAMPLE_PREDICTION = {
    "EulerAncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "PNDMScheduler",
}
FLOAT32_STEP = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"}
# Zero terminal SNR: these keep alpha_bar[-1] = 0; every other class floors it at 2**-24. diffusers'
# LMS, Heun, KDPM2, KDPM2 a, DPMSolverSDE, PNDM and DEIS ignore rescale_betas_zero_snr; the engine
# applies it to every sampler (sampling.config.MODEL_KEYS), so their reference is diffusers' own
# algorithm on the rescaled, floored alpha_bar table.
NO_TERMINAL_FLOOR = {"DDIMScheduler", "DDPMScheduler", "LCMScheduler"}
SHAPE = (2, 4, 8, 8)


def fake_denoiser(x: np.ndarray, t: float) -> np.ndarray:
    """Nonlinear in the sample and the timestep, so a wrong sigma, scale or timestep shows."""
    return np.tanh(0.3 * x) * math.cos(float(t) / 300.0) + 0.1 * x


def relative_max_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------- diffusers side


class BrownianPath:
    """Stand-in for ``torchsde.BrownianInterval``: a Brownian path known on a grid of sigmas."""

    grid: np.ndarray = np.zeros(0)
    values: np.ndarray = np.zeros(0)

    def __init__(self, t0, t1, size, dtype, device, entropy, **kwargs):
        del t0, t1, size, dtype, device, entropy, kwargs

    def __call__(self, ta, tb):
        return torch.from_numpy(self._at(float(tb)) - self._at(float(ta)))

    @classmethod
    def _at(cls, t: float) -> np.ndarray:
        j = int(np.argmin(np.abs(np.log(cls.grid) - math.log(t))))
        assert abs(cls.grid[j] / t - 1) < 1e-5, f"tree queried off the grid at {t}"
        return cls.values[j]

    @classmethod
    def walk(cls, sched: schedulers.Scheduler, noises: list[np.ndarray]) -> None:
        """W at the sigma of each evaluation such that every increment diffusers asks for,
        normalised, equals the noise our sampler gets (two halves per step, see karras.py)."""
        sigmas = np.sqrt(1.0 / sched.plan.input_scale**2 - 1.0)
        values = [np.zeros(SHAPE)]
        for j in range(len(sigmas) - 1):
            values.append(values[-1] + math.sqrt(sigmas[j] - sigmas[j + 1]) * noises[j])
        cls.grid, cls.values = sigmas, np.array(values)


@pytest.fixture(scope="module")
def sde_class():
    """diffusers' DPMSolverSDEScheduler, imported with the stand-in for torchsde."""
    saved = {k: sys.modules.get(k) for k in ("torchsde", "diffusers.schedulers.scheduling_dpmsolver_sde")}
    stub = types.ModuleType("torchsde")
    stub.BrownianInterval = BrownianPath
    sys.modules["torchsde"] = stub
    sys.modules.pop("diffusers.schedulers.scheduling_dpmsolver_sde", None)
    yield importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde").DPMSolverSDEScheduler
    for key, module in saved.items():
        if module is None:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = module


def betas64(c) -> torch.Tensor:
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        return torch.tensor(c.trained_betas, dtype=torch.float64)
    if c.beta_schedule == "linear":
        return torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float64)
    if c.beta_schedule == "scaled_linear":
        return torch.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=torch.float64) ** 2

    def bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
    )


def upgrade_tables(s) -> None:
    """Rebuild diffusers' float32 alpha_bar tables in float64, with the class's own rules."""
    c = s.config
    betas = betas64(c)
    rescale = bool(c.get("rescale_betas_zero_snr", False))  # classes without the flag keep the key
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    acp = torch.cumprod(1 - betas, 0)
    if rescale and type(s).__name__ not in NO_TERMINAL_FLOOR:
        acp[-1] = 2.0**-24
    s.betas, s.alphas, s.alphas_cumprod = betas, 1 - betas, acp
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if c.set_alpha_to_one else acp[0]
    if hasattr(s, "lambda_t"):
        s.alpha_t, s.sigma_t = acp.sqrt(), (1 - acp).sqrt()
        s.lambda_t = s.alpha_t.log() - s.sigma_t.log()


def widen_sigmas(s) -> None:
    """Widen the float32 sigma tables set_timesteps made, so later arithmetic runs in float64."""
    for name in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"):
        if isinstance(getattr(s, name, None), torch.Tensor):
            setattr(s, name, getattr(s, name).double())
    if type(s).__name__ == "KDPM2AncestralDiscreteScheduler":
        redo_kdpm2_ancestral(s)


def redo_kdpm2_ancestral(s) -> None:
    """Re-run the float32 part of KDPM2AncestralDiscreteScheduler.set_timesteps in float64, with
    diffusers' own expressions: in float32, sigma_down of the last ancestral step cancels (NaN
    timesteps for linear betas at 2 steps)."""
    sigmas = torch.cat([s.sigmas[:1], s.sigmas[1:-1:2]])
    nxt = sigmas.roll(-1)
    nxt[-1] = 0.0
    up = (nxt**2 * (sigmas**2 - nxt**2) / sigmas**2) ** 0.5
    down = (nxt**2 - up**2) ** 0.5
    down[-1] = 0.0
    interpol = sigmas.log().lerp(down.log(), 0.5).exp()
    interpol[-2:] = 0.0

    def rep(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])

    s.sigmas, s.sigmas_interpol, s.sigmas_up, s.sigmas_down = rep(sigmas), rep(interpol), rep(up), rep(down)
    log_sigmas = s.log_sigmas.cpu().numpy()
    t_interpol = np.array([s._sigma_to_t(v, log_sigmas) for v in interpol.numpy()])
    base = s.timesteps[0::2]
    t_interpol = torch.from_numpy(t_interpol).to(base.dtype)
    s.timesteps = torch.cat([base[:1], torch.stack((t_interpol[:-2], base[1:]), dim=-1).flatten()])


def make_diffusers(cls_name: str, config: dict, kwargs: dict, sde_class):
    cls = sde_class if cls_name == "DPMSolverSDEScheduler" else getattr(diffusers, cls_name)
    return cls.from_config(config, **kwargs)


def run_diffusers(s, steps, strength, x_t, image, noise_mode, noises, float64=True, step_kwargs=None):
    """The denoising loop of diffusers' txt2img / img2img pipelines, with the fake denoiser."""
    if float64:
        upgrade_tables(s)
    s.set_timesteps(steps)
    if float64:
        widen_sigmas(s)
    start = steps - min(int(steps * strength), steps)
    ts = s.timesteps[start * s.order :]
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(start * s.order)
    x_t, image = torch.from_numpy(x_t), torch.from_numpy(image)
    x = s.add_noise(image, x_t, ts[:1]) if strength < 1 else x_t * s.init_noise_sigma
    generator = torch.Generator().manual_seed(7)
    for i, t in enumerate(ts):
        out = torch.from_numpy(fake_denoiser(s.scale_model_input(x, t).numpy(), t))
        kwargs = dict(step_kwargs or {})
        if noise_mode == "generator":
            kwargs["generator"] = generator
        elif noise_mode == "variance":
            kwargs["variance_noise"] = torch.from_numpy(noises[i])
        x = s.step(out, t, x, **kwargs).prev_sample
    return x.numpy(), ts.numpy(), float(s.init_noise_sigma)


# ---------------------------------------------------------------------------------------- our side


def run_ours(sched, steps, strength, x_t, image, noises):
    sched.set_timesteps(steps, strength)
    x = sched.add_noise(image, x_t, 0) if strength < 1 else x_t * sched.init_noise_sigma
    generator = torch.Generator().manual_seed(7)
    for i, t in enumerate(sched.timesteps):
        out = fake_denoiser(sched.scale_model_input(x, i), t)
        noise = None
        if sched.noise_steps[i]:
            if noises is not None:
                noise = noises[i]
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).numpy()
        x = sched.step(out, i, x, noise=noise)
    return x


def float32_normals(n: int, seed: int) -> list[np.ndarray]:
    """Normals exactly representable in float32 (diffusers casts injected noise to float32)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32).astype(np.float64) for _ in range(n)]


def check_parity(label, cls_name, kwargs, noise_mode, config, steps, strength, sde_class, overrides=None):
    if cls_name == "LMSDiscreteScheduler":
        pytest.importorskip("scipy")  # diffusers' LMS integrates with scipy; ours does not need it
    overrides = overrides or {}
    ours = schedulers.create(label, config, **overrides)
    ours.set_timesteps(steps, strength)
    rng = np.random.default_rng(steps * 10 + int(strength * 10))
    x_t, image = rng.standard_normal(SHAPE), 0.8 * rng.standard_normal(SHAPE)
    noises = float32_normals(len(ours.timesteps), steps) if noise_mode in ("variance", "tree") else None
    if noise_mode == "tree":
        BrownianPath.walk(ours, noises)
    ref_sched = make_diffusers(cls_name, config, {**kwargs, **overrides}, sde_class)
    ref, ref_ts, ref_sigma = run_diffusers(ref_sched, steps, strength, x_t, image, noise_mode, noises)
    out = run_ours(ours, steps, strength, x_t, image, noises)

    assert ours.timesteps.dtype == ref_ts.dtype
    if ref_ts.dtype.kind == "i":
        np.testing.assert_array_equal(ours.timesteps, ref_ts)
    np.testing.assert_allclose(
        ours.timesteps.astype(np.float64), ref_ts.astype(np.float64), rtol=1e-6, atol=1e-4
    )
    if strength == 1:
        assert ours.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)
    tolerance = 1e-4 if cls_name in FLOAT32_STEP else 1e-5
    error = relative_max_error(out, ref)
    assert error <= tolerance, f"relative max error {error:.2e} > {tolerance:.0e}"


def _cases():
    for label, (cls_name, _, _) in CASES.items():
        for config_name in CONFIGS:
            if config_name == "cosine" and cls_name in NO_SAMPLE_PREDICTION:
                continue
            for steps in (1, 2, 3, 10, 25, 50):
                if cls_name == "PNDMScheduler" and config_name in ("linear", "cosine") and steps < 4:
                    continue  # PRK warm-up needs 4 steps: tested in test_pndm_prk_needs_four_steps
                yield pytest.param(label, config_name, steps, id=f"{label}-{config_name}-{steps}")


@pytest.mark.parametrize(("label", "config_name", "steps"), list(_cases()))
def test_txt2img_trajectory(label, config_name, steps, sde_class):
    cls_name, kwargs, noise_mode = CASES[label]
    check_parity(label, cls_name, kwargs, noise_mode, CONFIGS[config_name], steps, 1.0, sde_class)


def _img2img_cases():
    for label, (cls_name, _, _) in CASES.items():
        for config_name, steps, strength in (("sd15", 3, 0.7), ("sd15", 25, 0.6), ("zsnr", 10, 0.35)):
            yield pytest.param(
                label, config_name, steps, strength, id=f"{label}-{config_name}-{steps}-{strength}"
            )
        if cls_name not in NO_SAMPLE_PREDICTION:
            yield pytest.param(label, "cosine", 50, 0.8, id=f"{label}-cosine-50-0.8")


@pytest.mark.parametrize(("label", "config_name", "steps", "strength"), list(_img2img_cases()))
def test_img2img_trajectory(label, config_name, steps, strength, sde_class):
    cls_name, kwargs, noise_mode = CASES[label]
    check_parity(label, cls_name, kwargs, noise_mode, CONFIGS[config_name], steps, strength, sde_class)


# Settings beyond the labels: (diffusers class, config, overrides), run by class name on both sides.
OPTIONS = {
    "ddim-eta": ("DDIMScheduler", SD15, {}),  # eta goes to step() in diffusers, see below
    "ddim-linspace-clip": ("DDIMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": False}, {}),
    "ddpm-fixed-large": ("DDPMScheduler", SD15, {"variance_type": "fixed_large"}),
    "ddpm-trailing-v": ("DDPMScheduler", {**SD21V, "timestep_spacing": "trailing"}, {}),
    "pndm-prk": ("PNDMScheduler", {**SD15, "skip_prk_steps": False}, {}),
    "pndm-prk-v": ("PNDMScheduler", {**SD21V, "skip_prk_steps": False}, {}),
    "euler-sigma-min": ("EulerDiscreteScheduler", SD15, {"final_sigmas_type": "sigma_min"}),
    "euler-karras-range": (
        "EulerDiscreteScheduler",
        SD15,
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    ),
    "euler-continuous-v": ("EulerDiscreteScheduler", SD21V, {"timestep_type": "continuous"}),
    "heun-clip": ("HeunDiscreteScheduler", {**COSINE, "clip_sample": True}, {}),
    "dpm-3m": ("DPMSolverMultistepScheduler", SD15, {"solver_order": 3}),
    "dpm-3m-sde-heun": (
        "DPMSolverMultistepScheduler",
        SD21V,
        {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    ),
    "dpm-2m-heun": ("DPMSolverMultistepScheduler", SD15, {"solver_type": "heun"}),
    "dpm-euler-final": (
        "DPMSolverMultistepScheduler",
        SD15,
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    ),
    "dpm-no-lof": ("DPMSolverMultistepScheduler", SD15, {"lower_order_final": False, "solver_order": 3}),
    "dpm-lu": ("DPMSolverMultistepScheduler", SD15, {"use_lu_lambdas": True}),
    "dpm-clipped": ("DPMSolverMultistepScheduler", SD15, {"lambda_min_clipped": -3.0}),
    "dpm-leading-zsnr": ("DPMSolverMultistepScheduler", {**ZERO_SNR, "timestep_spacing": "leading"}, {}),
    "unipc-3-bh1": (
        "UniPCMultistepScheduler",
        SD15,
        {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    ),
    "unipc-3-karras": ("UniPCMultistepScheduler", SD21V, {"solver_order": 3, "use_karras_sigmas": True}),
    "unipc-no-corrector": ("UniPCMultistepScheduler", SD15, {"disable_corrector": [0, 2, 5]}),
    "unipc-sigma-min": ("UniPCMultistepScheduler", SD15, {"final_sigmas_type": "sigma_min"}),
    "deis-3": ("DEISMultistepScheduler", SD15, {"solver_order": 3}),
    "deis-3-exp": ("DEISMultistepScheduler", SD21V, {"solver_order": 3, "use_exponential_sigmas": True}),
    "lcm-v-30": ("LCMScheduler", {**SD21V, "original_inference_steps": 30}, {}),
    "euler-trained-betas": (
        "EulerDiscreteScheduler",
        {"trained_betas": list(np.geomspace(1e-4, 0.03, 1000))},
        {},
    ),
    "dpm2-leading": ("KDPM2DiscreteScheduler", {**SD15, "timestep_spacing": "leading"}, {}),
}


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trajectory(option, steps, sde_class):
    cls_name, config, overrides = OPTIONS[option]
    noise_mode = {"DDPMScheduler": "generator", "LCMScheduler": "generator"}.get(cls_name)
    if overrides.get("algorithm_type") == "sde-dpmsolver++":
        noise_mode = "variance"
    for strength in (1.0, 0.5):
        if option == "ddim-eta":
            check_ddim_eta(config, steps, strength)
            continue
        check_parity(cls_name, cls_name, {}, noise_mode, config, steps, strength, sde_class, overrides)


def check_ddim_eta(config, steps, strength):
    ours = schedulers.create("DDIM", config, eta=0.7)
    assert ours.stochastic
    rng = np.random.default_rng(steps)
    x_t, image = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    ref, _, _ = run_diffusers(
        diffusers.DDIMScheduler.from_config(config), steps, strength, x_t, image, "generator", None,
        step_kwargs={"eta": 0.7},
    )  # fmt: skip
    out = run_ours(ours, steps, strength, x_t, image, None)
    assert relative_max_error(out, ref) <= 1e-5


def test_pndm_prk_needs_four_steps():
    sched = schedulers.create("PNDM", LINEAR)
    with pytest.raises(ValueError, match="at least 4 steps"):
        sched.set_timesteps(3)


@pytest.mark.parametrize("label", ["Euler a", "DPM++ 2M Karras", "PNDM", "UniPC", "DPM2 a", "DDIM"])
def test_default_float32_diffusers(label, sde_class):
    """Against diffusers exactly as users run it (float32 tables): the gap is diffusers' rounding."""
    cls_name, kwargs, noise_mode = CASES[label]
    ours = schedulers.create(label, SD15)
    rng = np.random.default_rng(0)
    x_t, image = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    ref_sched = make_diffusers(cls_name, SD15, kwargs, sde_class)
    ref, ref_ts, _ = run_diffusers(ref_sched, 25, 1.0, x_t, image, noise_mode, None, float64=False)
    out = run_ours(ours, 25, 1.0, x_t, image, None)
    np.testing.assert_allclose(ours.timesteps, ref_ts, rtol=1e-5, atol=1e-4)
    assert relative_max_error(out, ref) <= 1e-4


def test_defaults_are_diffusers_signatures(sde_class):
    """Each sampler fills missing config keys with its diffusers class's own defaults."""
    from engine.sampling.registry import CLASSES, DEFAULTS

    for cls_name, algorithm in CLASSES.items():
        cls = sde_class if cls_name == "DPMSolverSDEScheduler" else getattr(diffusers, cls_name)
        params = inspect.signature(cls.__init__).parameters
        expected = {k: p.default for k, p in params.items() if k != "self"}
        ours = {k: v for k, v in DEFAULTS[algorithm].items() if k != "eta"}
        assert ours == {k: tuple(v) if isinstance(v, list) else v for k, v in expected.items()}, cls_name
