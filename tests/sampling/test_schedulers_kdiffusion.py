"""Samplers beyond diffusers (DPM++ 2S a, DPM++ 3M SDE, Euler a / DPM++ 2M on Karras, exponential and
Align-Your-Steps ladders) against k-diffusion's sampling loops, re-derived here in torch float64.

The reference builds its own ladder (betas, training sigmas, timestep spacing, Karras / exponential
/ AYS respacing) and its own CompVis-style denoiser wrapper, then runs k-diffusion's loop; only the
fake network and the injected noise are shared with our run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine import schedulers  # noqa: E402

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
SD21V = {**SD15, "prediction_type": "v_prediction"}
CONFIGS = {"sd15": SD15, "sd21v": SD21V}
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
SHAPE = (2, 4, 8, 8)


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The same fake denoiser as the diffusers parity tests."""
    return torch.tanh(0.3 * x) * torch.cos(t / 300.0) + 0.1 * x


class CompVisDenoiser:
    """k-diffusion's wrapper of an eps / v network trained on discrete alpha_bar."""

    def __init__(self, config: dict, t_round: bool = False):
        betas = (
            torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64)
            ** 2
        )
        acp = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - acp) / acp) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.v = config.get("prediction_type") == "v_prediction"
        self.t_round = t_round

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.round() if self.t_round else t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        out = network(x * c_in, self.sigma_to_t(sigma.reshape(1)).reshape(()))
        if self.v:
            return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
        return x - sigma * out


def ladder(model: CompVisDenoiser, steps: int, schedule: str) -> torch.Tensor:
    """Euler-style ladder: linspace timesteps, then optional respacing; ends with 0."""
    t = np.linspace(0, 999, steps, dtype=np.float32)[::-1].astype(np.float64)
    base = torch.from_numpy(np.interp(t, np.arange(1000), model.sigmas.numpy()))
    lo, hi = float(base[-1]), float(base[0])
    if schedule == "karras":  # k_diffusion.sampling.get_sigmas_karras
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        base = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    elif schedule == "exponential":  # k_diffusion.sampling.get_sigmas_exponential
        base = torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp()
    elif schedule == "ays":  # NVIDIA's "How to use AYS" loglinear_interp, last level replaced by 0
        xs, ys = np.linspace(0, 1, len(AYS_SD15)), np.log(AYS_SD15[::-1])
        base = torch.from_numpy(np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1][:-1].copy())
    return torch.cat([base, base.new_zeros(1)])


def ancestral_step(s_from, s_to, eta=1.0):
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
    return (s_to**2 - up**2) ** 0.5, up


def sample_euler_ancestral(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(i) * up
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, noise, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -torch.as_tensor(down).log()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, (-s).exp())
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0 and up:
            x = x + noise(2 * i + 1) * up
    return x


def sample_dpmpp_3m_sde(model, x, sigmas, noise, eta=1.0):
    denoised_1 = denoised_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise(i) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def sample_dpmpp_2m(model, x, sigmas, noise):
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old = denoised
    return x


REFERENCES = {
    "Euler a": (sample_euler_ancestral, {}),
    "DPM++ 2S a": (sample_dpmpp_2s_ancestral, {}),
    "DPM++ 3M SDE": (sample_dpmpp_3m_sde, {}),
    "DPM++ 2M": (sample_dpmpp_2m, {}),
}
SCHEDULES = {"": "default", " Karras": "karras", " Exponential": "exponential", " AYS": "ays"}


def run_both(base, suffix, config, steps, strength, overrides=None):
    overrides = overrides or {}
    label = base + suffix
    sched = schedulers.create(label, config, **overrides)
    sched.set_timesteps(steps, strength)
    vp = base == "DPM++ 2M"  # diffusers-style: VP samples, rounded integer timesteps
    model = CompVisDenoiser(config, t_round=vp)
    sigmas = ladder(model, steps, SCHEDULES[suffix])
    start = steps - min(int(steps * strength), steps)
    sigmas = sigmas[start:]
    rng = np.random.default_rng(steps)
    x_t, image = rng.standard_normal(SHAPE), 0.8 * rng.standard_normal(SHAPE)
    noises = [rng.standard_normal(SHAPE) for _ in sched.timesteps]

    sampler, kwargs = REFERENCES[base]
    init = float(sigmas[0]) if not vp else math.sqrt(float(sigmas[0]) ** 2 + 1)  # VP: unit-variance start
    x0 = torch.from_numpy(image + x_t * float(sigmas[0]) if strength < 1 else x_t * init)
    ref = sampler(model, x0, sigmas, lambda j: torch.from_numpy(noises[j]), **{**kwargs, **overrides}).numpy()

    x = sched.add_noise(image, x_t, 0) if strength < 1 else x_t * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        out = network(torch.from_numpy(sched.scale_model_input(x, i)), torch.tensor(float(t))).numpy()
        x = sched.step(out, i, x, noise=noises[i] if sched.noise_steps[i] else None)
    if not vp and strength == 1:
        assert sched.init_noise_sigma == pytest.approx(float(sigmas[0]), rel=1e-6)
    return x, ref


def _cases():
    for base in REFERENCES:
        for suffix in SCHEDULES:
            if base == "DPM++ 2M" and suffix != " AYS":
                continue  # its other ladders are diffusers': see test_schedulers_parity
            for config in CONFIGS:
                for steps in (1, 2, 3, 10, 25, 50):
                    yield pytest.param(base, suffix, config, steps, id=f"{base}{suffix}-{config}-{steps}")


@pytest.mark.parametrize(("base", "suffix", "config", "steps"), list(_cases()))
def test_matches_k_diffusion(base, suffix, config, steps):
    ours, ref = run_both(base, suffix, CONFIGS[config], steps, 1.0)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize(
    ("base", "suffix"),
    [(b, s) for b in REFERENCES for s in (" Karras", " AYS") if (b, s) != ("DPM++ 2M", " Karras")],
)
def test_img2img_matches_k_diffusion(base, suffix):
    ours, ref = run_both(base, suffix, SD15, 20, 0.55)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("base", ["DPM++ 2S a", "DPM++ 3M SDE"])
def test_eta(base, eta):
    ours, ref = run_both(base, " Karras", SD21V, 12, 1.0, {"eta": eta})
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5
    assert schedulers.create(base, SD21V, eta=eta).stochastic == (eta > 0)
