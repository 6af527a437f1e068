"""Samplers over a Karras sigma ladder (k-diffusion style): Euler, Euler a, LMS, Heun, DPM2, DPM2 a,
DPM++ SDE and DPM++ 2S a. The sample x has noise level sigma: x = x0 + sigma * eps.

Two-stage samplers (Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a) evaluate the model twice per step,
like diffusers: evaluation ``2k`` starts step k, evaluation ``2k + 1`` finishes it from the sample
kept at ``2k``; the last step is a single Euler evaluation to sigma = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import Prediction, SchedulerConfig, Spacing, TimestepType
from .parameterization import karras_denoiser
from .plan import Plan, Source, Update, terms
from .schedules import Ladder, LadderRules, sigma_ladder, sigma_to_t

X, D, N = Source.SAMPLE, Source.DENOISED, Source.NOISE

RULES = LadderRules()
DPM2_RULES = LadderRules(schedule_dtype=np.float64, round_karras_timesteps=True)
SDE_RULES = LadderRules(dtype=np.float64, schedule_dtype=np.float64)


@dataclass(frozen=True)
class Eval:
    """One model evaluation: its timestep, the sigma of its input, and what step returns."""

    timestep: float
    sigma_in: float
    update: Update


def karras_plan(cfg: SchedulerConfig, lad: Ladder, evals: list[Eval], begin: int, order: int) -> Plan:
    """Plan of a Karras-ladder sampler; the first ``begin`` evaluations are skipped (img2img)."""
    sigma_max = float(np.max(lad.sigmas))
    leading = cfg.timestep_spacing is Spacing.LEADING
    sigma_in = np.array([e.sigma_in for e in evals])
    rep = lad.sigmas[(np.arange(len(evals)) + order - 1) // order]  # diffusers' add_noise sigma
    return Plan(
        timesteps=np.array([e.timestep for e in evals], dtype=lad.timesteps.dtype)[begin:],
        init_noise_sigma=math.sqrt(sigma_max**2 + 1) if leading else sigma_max,
        input_scale=(1.0 / np.sqrt(sigma_in**2 + 1.0))[begin:],
        denoiser=karras_denoiser(cfg.prediction_type, sigma_in, _clip(cfg)).tail(begin),
        updates=tuple(e.update for e in evals[begin:]),
        noise_scale=np.stack([np.ones_like(rep), rep], axis=1)[begin:],
        order=order,
    )


def _clip(cfg: SchedulerConfig) -> float | None:
    return cfg.clip_sample_range if cfg.clip_sample else None


def ancestral(s_from: float, s_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise.

    sigma_down^2 = s_to^2 - sigma_up^2 is expanded so that eta = 1 gives s_to^2 / s_from exactly
    (diffusers' float32 subtraction cancels on the last ancestral step of short runs).
    """
    up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    if up == s_to:
        return 0.0, up
    ratio = (s_to / s_from) ** 2
    return s_to * math.sqrt(max((1 - eta**2) + eta**2 * ratio, 0.0)), up


def ode_step(s: float, s_to: float, lag: int = 0, up: float = 0.0) -> tuple[tuple, ...]:
    """Euler step of dx/dsigma = (x - x0) / sigma from the sample ``lag`` evaluations back."""
    r = s_to / s
    noise = ((N, 0, up),) if up else ()
    return ((X, lag, r), (D, 0, 1.0 - r), *noise)


def build_euler(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """Euler's method (Karras et al. 2022, alg. 2 without churn)."""
    lad = sigma_ladder(cfg, steps, RULES)
    s = lad.sigmas
    ts = lad.timesteps
    if cfg.timestep_type is TimestepType.CONTINUOUS and cfg.prediction_type is Prediction.V_PREDICTION:
        ts = (0.25 * np.log(s[:-1].astype(np.float32))).astype(np.float32)
    evals = [Eval(ts[k], s[k], Update(terms(*ode_step(s[k], s[k + 1])))) for k in range(steps)]
    return karras_plan(cfg, lad, evals, begin, 1)


def build_euler_ancestral(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """Ancestral Euler: step down to sigma_down, then add fresh noise of std sigma_up."""
    lad = sigma_ladder(cfg, steps, RULES)
    s = lad.sigmas
    evals = []
    for k in range(steps):
        down, up = ancestral(s[k], s[k + 1])
        evals.append(Eval(lad.timesteps[k], s[k], Update(terms(*ode_step(s[k], down), (N, 0, up)), (), True)))
    return karras_plan(cfg, lad, evals, begin, 1)


def lms_coefficient(sigmas: np.ndarray, k: int, order: int, j: int) -> float:
    """Integral over [sigma_k, sigma_k+1] of the Lagrange basis polynomial of node sigma_{k-j}."""
    nodes = [float(sigmas[k - m]) for m in range(order)]
    others = [node for m, node in enumerate(nodes) if m != j]
    poly = np.polyint(np.atleast_1d(np.poly(others)) / math.prod(nodes[j] - node for node in others))
    return float(np.polyval(poly, sigmas[k + 1]) - np.polyval(poly, sigmas[k]))


def build_lms(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """Linear multistep on the derivatives (x - x0) / sigma of up to four evaluations.

    Like diffusers, the polynomial order follows the absolute step (min(k + 1, 4)) while only
    derivatives of this run are summed, which matters when img2img starts mid-ladder.
    """
    lad = sigma_ladder(cfg, steps, RULES)
    s = lad.sigmas
    evals = []
    for k in range(steps):
        order = min(k + 1, 4)
        seen = min(k - begin + 1, order) if k >= begin else 1
        parts = [(X, 0, 1.0)]
        for j in range(seen):
            c = lms_coefficient(s, k, order, j) / s[k - j]
            parts += [(X, j, c), (D, j, -c)]
        evals.append(Eval(lad.timesteps[k], s[k], Update(terms(*parts))))
    return karras_plan(cfg, lad, evals, begin, 1)


def _interleave(first: np.ndarray, second: np.ndarray) -> list:
    """[first[0], second[0], first[1], second[1], ..., first[-1]]: two evaluations per step."""
    out = []
    for k, t in enumerate(first):
        out.append(t)
        if k < len(second):
            out.append(second[k])
    return out


def _two_stage(
    lad: Ladder, mids: np.ndarray, sigma_in2: np.ndarray, firsts: list, seconds: list
) -> list[Eval]:
    ts = _interleave(lad.timesteps, sigma_to_t(mids, lad.log_sigmas).astype(lad.timesteps.dtype))
    sig = _interleave(lad.sigmas[:-1], sigma_in2)
    return [Eval(t, s, u) for t, s, u in zip(ts, sig, _interleave(firsts, seconds), strict=True)]


def build_heun(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """Heun's method (Karras et al. 2022, alg. 1): Euler, then average the two slopes."""
    lad = sigma_ladder(cfg, steps, RULES)
    s = lad.sigmas
    firsts = [Update(terms(*ode_step(s[k], s[k + 1]))) for k in range(steps)]
    seconds = []
    for k in range(steps - 1):
        dt = s[k + 1] - s[k]
        half0, half1 = dt / (2 * s[k]), dt / (2 * s[k + 1])
        seconds.append(Update(terms((X, 1, 1 + half0), (D, 1, -half0), (X, 0, half1), (D, 0, -half1))))
    ts = _interleave(lad.timesteps, lad.timesteps[1:])
    sig = _interleave(s[:-1], s[1:-1])
    evals = [Eval(t, x, u) for t, x, u in zip(ts, sig, _interleave(firsts, seconds), strict=True)]
    return karras_plan(cfg, lad, evals, begin, 2)


def build_dpm2(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DPM-Solver-2 (Lu et al. 2022) in k-diffusion's form: the slope at the log-midpoint sigma."""
    lad = sigma_ladder(cfg, steps, DPM2_RULES)
    s = lad.sigmas
    mids = np.sqrt(s[1:-1] * s[:-2])
    firsts = [Update(terms(*ode_step(s[k], mids[k] if k < steps - 1 else 0.0))) for k in range(steps)]
    seconds = []
    for k in range(steps - 1):
        c = (s[k + 1] - s[k]) / mids[k]
        seconds.append(Update(terms((X, 1, 1.0), (X, 0, c), (D, 0, -c))))
    return karras_plan(cfg, lad, _two_stage(lad, mids, mids, firsts, seconds), begin, 2)


def build_dpm2_ancestral(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """Ancestral DPM-Solver-2: the midpoint step aims at sigma_down, then noise of std sigma_up."""
    lad = sigma_ladder(cfg, steps, DPM2_RULES)
    s = lad.sigmas
    split = [ancestral(s[k], s[k + 1]) for k in range(steps - 1)]
    mids = np.array([math.sqrt(s[k] * down) for k, (down, _) in enumerate(split)])
    firsts = [Update(terms(*ode_step(s[k], mids[k] if k < steps - 1 else 0.0))) for k in range(steps)]
    seconds = []
    for k, (down, up) in enumerate(split):
        c = (down - s[k]) / mids[k]
        seconds.append(Update(terms((X, 1, 1.0), (X, 0, c), (D, 0, -c), (N, 0, up)), (), True))
    return karras_plan(cfg, lad, _two_stage(lad, mids, mids, firsts, seconds), begin, 2)


def build_dpmpp_sde(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DPM-Solver++(2S) SDE with r = 1/2 (k-diffusion ``sample_dpmpp_sde``, diffusers' DPMSolverSDE).

    diffusers queries a Brownian tree over [sigma_k, mid_k] and then over [sigma_k, sigma_k+1]; the
    second increment contains the first. With fresh standard normals n1, n2 given at the two
    evaluations, the second noise is (sqrt(d1) n1 + sqrt(d2) n2) / sqrt(d1 + d2), d1 = sigma_k - mid_k,
    d2 = mid_k - sigma_k+1: the same joint law as the tree, exactly.
    """
    lad = sigma_ladder(cfg, steps, SDE_RULES)
    s = lad.sigmas
    mids = np.sqrt(s[:-2] * s[1:-1])
    firsts, seconds = [], []
    for k in range(steps):
        if k == steps - 1:
            firsts.append(Update(terms(*ode_step(s[k], 0.0))))
            break
        down, up = ancestral(s[k], mids[k])
        firsts.append(Update(terms(*ode_step(s[k], down), (N, 0, up)), (), True))
        down, up = ancestral(s[k], s[k + 1])
        d1, d2 = s[k] - mids[k], mids[k] - s[k + 1]
        w1, w2 = math.sqrt(d1 / (d1 + d2)), math.sqrt(d2 / (d1 + d2))
        seconds.append(
            Update(terms(*ode_step(s[k], down, lag=1), (N, 1, up * w1), (N, 0, up * w2)), (), True)
        )
    return karras_plan(cfg, lad, _two_stage(lad, mids, mids, firsts, seconds), begin, 2)


def build_dpmpp_2s_ancestral(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DPM-Solver++(2S) ancestral (k-diffusion ``sample_dpmpp_2s_ancestral``), eta = cfg.eta."""
    lad = sigma_ladder(cfg, steps, RULES)
    s = lad.sigmas
    split = [ancestral(s[k], s[k + 1], cfg.eta) for k in range(steps - 1)]
    mids = np.array([math.sqrt(s[k] * down) for k, (down, _) in enumerate(split)])
    firsts = [Update(terms(*ode_step(s[k], mids[k] if k < steps - 1 else 0.0))) for k in range(steps)]
    seconds = [
        Update(terms(*ode_step(s[k], down, lag=1), (N, 0, up)), (), up > 0)
        for k, (down, up) in enumerate(split)
    ]
    return karras_plan(cfg, lad, _two_stage(lad, mids, mids, firsts, seconds), begin, 2)
