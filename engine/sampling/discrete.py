"""Samplers over integer training timesteps and alpha_bar (DDIM, DDPM, PNDM, LCM), as in diffusers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import Prediction, SchedulerConfig, VarianceType
from .parameterization import eps_coefficients, make_denoiser
from .plan import Plan, Source, Update, terms
from .schedules import alphas_cumprod, discrete_timesteps, lcm_timesteps

X, M, D, N = Source.SAMPLE, Source.MODEL, Source.DENOISED, Source.NOISE


def _clip(cfg: SchedulerConfig) -> float | None:
    return cfg.clip_sample_range if cfg.clip_sample else None


def _vp_plan(
    cfg: SchedulerConfig, ts: np.ndarray, acp: np.ndarray, updates: list[Update], begin: int
) -> Plan:
    """Plan of a sampler whose samples are VP at alpha_bar[t]; ``updates`` covers the tail only."""
    a_t = acp[ts]
    alpha, sigma = np.sqrt(a_t), np.sqrt(1.0 - a_t)
    denoiser = make_denoiser(cfg.prediction_type, alpha, sigma, 1.0, _clip(cfg)).tail(begin)
    return Plan(
        timesteps=ts[begin:].astype(np.int64),
        init_noise_sigma=1.0,
        input_scale=np.ones(len(ts) - begin),
        denoiser=denoiser,
        updates=tuple(updates),
        noise_scale=np.stack([alpha, sigma], axis=1)[begin:],
        order=1,
    )


def _previous_alpha_bar(acp: np.ndarray, prev: np.ndarray, final: float) -> np.ndarray:
    return np.where(prev >= 0, acp[np.clip(prev, 0, None)], final)


def build_ddim(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DDIM (Song et al. 2020, eq. 12); eta > 0 adds fresh noise of std eta * sigma_t."""
    acp = alphas_cumprod(cfg)
    ts = discrete_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    a_t = acp[ts]
    a_prev = _previous_alpha_bar(acp, ts - cfg.num_train_timesteps // steps, final)
    std = cfg.eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    e_skip, e_out = eps_coefficients(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    c_eps = np.sqrt(np.maximum(1 - a_prev - std**2, 0.0))
    updates = [
        Update(
            terms((D, 0, np.sqrt(a_prev[a])), (X, 0, c_eps[a] * e_skip[a]), (M, 0, c_eps[a] * e_out[a]))
            + (terms((N, 0, std[a])) if cfg.eta > 0 else ()),
            draws_noise=cfg.eta > 0,
        )
        for a in range(begin, steps)
    ]
    return _vp_plan(cfg, ts, acp, updates, begin)


def build_ddpm(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) on a subsequence of the training steps."""
    acp = alphas_cumprod(cfg)
    ts = discrete_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)
    a_t = acp[ts]
    a_prev = _previous_alpha_bar(acp, np.append(ts[1:], -1), 1.0)
    beta = 1 - a_t / a_prev
    c_x0 = np.sqrt(a_prev) * beta / (1 - a_t)
    c_x = np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)
    small = np.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    std = np.sqrt(beta) if cfg.variance_type is VarianceType.FIXED_LARGE else np.sqrt(small)
    updates = []
    for a in range(begin, steps):
        noisy = bool(ts[a] > 0)
        noise = ((N, 0, std[a]),) if noisy else ()
        updates.append(Update(terms((D, 0, c_x0[a]), (X, 0, c_x[a]), *noise), draws_noise=noisy))
    return _vp_plan(cfg, ts, acp, updates, begin)


def build_lcm(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """Multistep consistency sampling (Luo et al. 2023): denoise, then re-noise to the next timestep."""
    acp = alphas_cumprod(cfg)
    ts = lcm_timesteps(cfg.num_train_timesteps, cfg.original_inference_steps, steps)
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    a_prev = _previous_alpha_bar(acp, np.append(ts[1:], ts[-1]), final)
    scaled = ts * cfg.timestep_scaling
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / np.sqrt(scaled**2 + 0.25)
    updates = []
    for a in range(begin, steps):
        last = a == steps - 1
        k, s = (1.0, 0.0) if last else (np.sqrt(a_prev[a]), np.sqrt(1 - a_prev[a]))
        noise = () if last else ((N, 0, s),)
        updates.append(
            Update(terms((D, 0, k * c_out[a]), (X, 0, k * c_skip[a]), *noise), draws_noise=not last)
        )
    return _vp_plan(cfg, ts, acp, updates, begin)


def pndm_timesteps(cfg: SchedulerConfig, steps: int) -> tuple[np.ndarray, int]:
    """PNDM's evaluation timesteps and how many of them are Runge-Kutta warm-up (PRK) evaluations."""
    base = discrete_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset)[::-1]
    if cfg.skip_prk_steps:
        return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64), 0
    if steps < 4:
        raise ValueError(f"PNDM with skip_prk_steps=False needs at least 4 steps, got {steps}")
    half = cfg.num_train_timesteps // steps // 2
    prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return np.concatenate([prk, base[:-3][::-1]]).astype(np.int64), len(prk)


Lin = dict[tuple[Source, int], float]  # a symbolic linear combination of (source, evaluation) arrays


def _mix(*parts: tuple[float, Lin]) -> Lin:
    out: Lin = {}
    for c, lin in parts:
        for key, v in lin.items():
            out[key] = out.get(key, 0.0) + c * v
    return out


def _pndm_prev(
    cfg: SchedulerConfig, acp: np.ndarray, final: float, t: int, prev_t: int, x: Lin, m: Lin
) -> Lin:
    """PNDM's transfer from t to prev_t (Liu et al. 2022, eq. 11); v outputs become eps first."""
    a_t = acp[t]
    a_p = acp[prev_t] if prev_t >= 0 else final
    if cfg.prediction_type is Prediction.V_PREDICTION:
        m = _mix((np.sqrt(a_t), m), (np.sqrt(1 - a_t), x))
    denom = a_t * np.sqrt(1 - a_p) + np.sqrt(a_t * (1 - a_t) * a_p)
    return _mix((np.sqrt(a_p / a_t), x), (-(a_p - a_t) / denom, m))


_PLMS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_RK4 = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


@dataclass
class _PndmState:
    """diffusers' PNDM attributes (ets, cur_model_output, cur_sample) as symbolic combinations."""

    ets: list[Lin] = field(default_factory=list)
    acc: Lin = field(default_factory=dict)
    held: Lin | None = None


def _prk_eval(st: _PndmState, i: int, t: int, base_t: int, half: int) -> tuple[Lin, int, int, Lin]:
    """Runge-Kutta warm-up evaluation: (sample, from, to, model combination) of ``_pndm_prev``."""
    x, m = {(X, i): 1.0}, {(M, i): 1.0}
    phase = i % 4
    if phase == 0:
        st.ets.append(m)
        st.held = x
    if phase < 3:
        st.acc = _mix((1.0, st.acc), (_RK4[phase], m))
        mo = m
    else:
        mo, st.acc = _mix((1.0, st.acc), (_RK4[3], m)), {}
    return st.held or x, base_t, t - (0 if i % 2 else half), mo


def _plms_eval(st: _PndmState, i: int, t: int, ratio: int) -> tuple[Lin, int, int, Lin]:
    """Linear multistep evaluation; evaluation 1 redoes step 0 with the averaged output."""
    x, m = {(X, i): 1.0}, {(M, i): 1.0}
    if i == 1:
        t_from, t_to = t + ratio, t
    else:
        t_from, t_to = t, t - ratio
        st.ets = [*st.ets[-3:], m]
    if i == 0 and len(st.ets) == 1:
        st.held = x
        return x, t_from, t_to, m
    if i == 1 and len(st.ets) == 1:
        held, st.held = st.held or x, None
        return held, t_from, t_to, _mix((0.5, m), (0.5, st.ets[-1]))
    weights = _PLMS[len(st.ets)]
    return x, t_from, t_to, _mix(*((w, e) for w, e in zip(weights, reversed(st.ets), strict=True)))


def build_pndm(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """PNDM / PLMS (Liu et al. 2022), replaying diffusers' counter logic on symbolic arrays.

    The update of each evaluation is linear in earlier model outputs and samples, so running
    diffusers' bookkeeping once on {(source, index): weight} maps yields the terms. diffusers
    restarts its counter at the first evaluation it is given (img2img included): the counter is
    the tail index ``i``, while the warm-up's reference timesteps come from the full run.

    diffusers' PNDMScheduler ignores ``rescale_betas_zero_snr``; here it applies, with alpha_bar[-1]
    floored at 2**-24 like the Euler-type samplers (the transfer divides by sqrt(alpha_bar)).
    """
    if cfg.prediction_type is Prediction.SAMPLE:
        raise ValueError("PNDM supports prediction_type 'epsilon' and 'v_prediction', not 'sample'")
    acp = alphas_cumprod(cfg, terminal_floor=True)  # its transfer divides by sqrt(alpha_bar)
    final = 1.0 if cfg.set_alpha_to_one else acp[0]
    full, n_prk = pndm_timesteps(cfg, steps)
    ratio = cfg.num_train_timesteps // steps
    state = _PndmState()
    updates = []
    for i, t in enumerate(int(v) for v in full[begin:]):
        if i < n_prk:
            sample, t_from, t_to, mo = _prk_eval(state, i, t, int(full[i // 4 * 4]), ratio // 2)
        else:
            sample, t_from, t_to, mo = _plms_eval(state, i, t, ratio)
        prev = _pndm_prev(cfg, acp, final, t_from, t_to, sample, mo)
        updates.append(Update(terms(*((s, i - j, c) for (s, j), c in prev.items()))))
    return _vp_plan(cfg, full, acp, updates, begin)
