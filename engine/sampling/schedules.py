"""Noise schedules as pure functions: betas, timestep spacings and sigma ladders, all in float64.

The formulas follow diffusers' schedulers (the reference for timesteps and sigmas) and
k-diffusion (Karras et al. 2022 for the sigma ramp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import BetaSchedule, FinalSigmas, SchedulerConfig, SigmaSchedule, Spacing

# Align-Your-Steps noise levels for 10 steps (Sabour et al. 2024), SD 1.5 and SDXL.
AYS_LEVELS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021), capped at ``max_beta``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def make_betas(cfg: SchedulerConfig) -> np.ndarray:
    """The training betas a config describes."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float64)
    if cfg.beta_schedule is BetaSchedule.LINEAR:
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    if cfg.beta_schedule is BetaSchedule.SCALED_LINEAR:
        return np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2
    return betas_for_alpha_bar(n)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, alg. 1)."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(cfg: SchedulerConfig, terminal_floor: bool = False) -> np.ndarray:
    """alpha_bar ``terminal_floor`` keeps sigma finite at zero SNR (2**-24, like diffusers)."""
    betas = make_betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    acp = np.cumprod(1.0 - betas)
    if cfg.rescale_betas_zero_snr and terminal_floor:
        acp[-1] = 2.0**-24
    return acp


def training_sigmas(acp: np.ndarray) -> np.ndarray:
    """The VE noise level of each training step: sqrt((1 - alpha_bar) / alpha_bar)."""
    return np.sqrt((1.0 - acp) / acp)


def leading_offset(n_train: int, top: int, offset: int) -> int:
    """``steps_offset``, lowered just enough that the top timestep ``top + offset`` is <= n_train - 1.

    diffusers adds the offset regardless: with leading spacing and steps_offset 1, 1000 steps give
    timestep 1000, and DDIM / DDPM / PNDM index alpha_bar[1000] (IndexError), Euler-type samplers
    repeat sigma(999) (LMS, DPM++ SDE, DPM++ 3M SDE then divide by zero) and the multistep solvers
    do the same at 999 steps. Lowering the offset keeps the leading ladder's spacing and ends it on
    the last training timestep; nothing changes wherever the offset fits.
    """
    return min(offset, n_train - 1 - top)


def trailing_points(last: int, n_train: int, steps: int) -> np.ndarray:
    """``np.arange(last, 0, -n_train / steps)`` as diffusers writes it, cut to ``steps`` values.

    In floating point that arange has steps + 1 entries for 62 step counts (61, 103, 121, ... 998 of
    1000): the extra one is ~1e-13 and becomes timestep -1, which diffusers runs as one more step
    (alpha_bar[-1] wraps to the last entry). The first ``steps`` values are diffusers' own.
    """
    return np.arange(last, 0, -n_train / steps)[:steps]


def discrete_timesteps(spacing: Spacing, n_train: int, steps: int, offset: int) -> np.ndarray:
    """Descending integer timesteps of DDIM / DDPM / PNDM (Lin et al. 2023, table 2)."""
    if spacing is Spacing.LINSPACE:
        return np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
    if spacing is Spacing.LEADING:
        base = (np.arange(steps) * (n_train // steps))[::-1].astype(np.int64)
        return base + leading_offset(n_train, int(base[0]), offset)
    return np.round(trailing_points(n_train, n_train, steps)).astype(np.int64) - 1


def sigma_timesteps(spacing: Spacing, n_train: int, steps: int, offset: int, dtype: type) -> np.ndarray:
    """Descending timesteps of the sigma samplers (Euler, Heun, LMS, ...), in diffusers' dtype."""
    if spacing is Spacing.LINSPACE:
        return np.linspace(0, n_train - 1, steps, dtype=dtype)[::-1].copy()
    if spacing is Spacing.LEADING:
        ts = (np.arange(steps) * (n_train // steps)).round()[::-1].astype(dtype)
        return ts + dtype(leading_offset(n_train, int(ts[0]), offset))
    return trailing_points(n_train, n_train, steps).round().astype(dtype) - dtype(1)


def multistep_timesteps(spacing: Spacing, n_train: int, steps: int, offset: int, last: int) -> np.ndarray:
    """Descending integer timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS).

    These spacings place steps + 1 points and drop the lowest, so at steps = n_train leading spacing
    gives n_train copies of steps_offset and linspace repeats a timestep (diffusers: NaN). There the
    ladder is every training timestep, n_train - 1 down to 0, what trailing spacing gives anyway.
    With ``lambda_min_clipped`` (``last`` < n_train) the result may repeat timesteps or have fewer
    than ``steps``: :mod:`engine.sampling.steps` refuses those counts.
    """
    if steps == last == n_train:
        return np.arange(n_train, dtype=np.int64)[::-1].copy()
    if spacing is Spacing.LINSPACE:
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing is Spacing.LEADING:
        ratio = last // (steps + 1)
        base = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        return base + leading_offset(n_train, int(base[0]), offset)
    return np.round(trailing_points(last, n_train, steps)).astype(np.int64) - 1


def lcm_timesteps(n_train: int, original_steps: int, steps: int) -> np.ndarray:
    """Latent Consistency Model timesteps: a subset of the distillation schedule (Luo et al. 2023)."""
    if original_steps > n_train:
        raise ValueError(f"original_inference_steps {original_steps} exceeds num_train_timesteps {n_train}")
    if steps > original_steps:
        raise ValueError(f"LCM takes at most original_inference_steps={original_steps} steps, got {steps}")
    origin = (np.arange(1, original_steps + 1) * (n_train // original_steps) - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Constructs the noise schedule of Karras et al. (2022), eq. 5."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Constructs an exponential noise schedule (uniform in log sigma)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def ays_sigmas(n: int, levels: tuple[float, ...] = AYS_LEVELS["sd15"]) -> np.ndarray:
    """Align Your Steps (Sabour et al. 2024): the 10-step levels, log-linearly resampled to n + 1.

    Returns n sigmas; the caller appends the final (zero) sigma, which replaces the last level.
    """
    logs = np.log(np.asarray(levels, dtype=np.float64))[::-1]
    resampled = np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(levels)), logs))[::-1]
    return resampled[:-1].copy()


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


@dataclass(frozen=True)
class LadderRules:
    """Where diffusers' sigma samplers differ from each other in building their ladder."""

    dtype: type = np.float32  # timestep dtype with the default schedule
    schedule_dtype: type = np.float32  # ... and after a Karras / exponential / AYS conversion
    round_karras_timesteps: bool = False


@dataclass(frozen=True)
class Ladder:
    """Timesteps (one per step) and sigmas (one per step plus the final one) of a sampling run."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    log_sigmas: np.ndarray  # of the training steps, for sigma_to_t of intermediate sigmas
    acp: np.ndarray


def sigma_ladder(cfg: SchedulerConfig, steps: int, rules: LadderRules) -> Ladder:
    """The ladder of Euler-type samplers: spaced timesteps, interpolated sigmas, optional respacing.

    Under ``rescale_betas_zero_snr`` alpha_bar ends at 2**-24, not 0, so sigma_max is finite (~4096),
    as diffusers' Euler does; the samplers whose diffusers class ignores the flag use the same table.
    """
    acp = alphas_cumprod(cfg, terminal_floor=True)
    train = training_sigmas(acp)
    log_sigmas = np.log(train)
    ts = sigma_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset, rules.dtype)
    sigmas = np.interp(ts.astype(np.float64), np.arange(len(train)), train)
    lo = cfg.sigma_min if cfg.sigma_min is not None else sigmas[-1]
    hi = cfg.sigma_max if cfg.sigma_max is not None else sigmas[0]
    sigmas = respace(cfg.sigma_schedule, lo, hi, steps, sigmas)
    if cfg.sigma_schedule is not SigmaSchedule.DEFAULT:
        ts = sigma_to_t(sigmas, log_sigmas)
        if rules.round_karras_timesteps and cfg.sigma_schedule is SigmaSchedule.KARRAS:
            ts = ts.round()
        ts = ts.astype(rules.schedule_dtype)
    final = train[0] if cfg.final_sigmas_type is FinalSigmas.SIGMA_MIN else 0.0
    return Ladder(ts, np.append(sigmas, final), log_sigmas, acp)


def respace(kind: SigmaSchedule, lo: float, hi: float, steps: int, sigmas: np.ndarray) -> np.ndarray:
    """Replace a ladder's sigmas by the chosen schedule between ``lo`` and ``hi``."""
    if kind is SigmaSchedule.KARRAS:
        return karras_sigmas(lo, hi, steps)
    if kind in (SigmaSchedule.EXPONENTIAL, SigmaSchedule.LU_LAMBDAS):
        return exponential_sigmas(lo, hi, steps)
    if kind is SigmaSchedule.ALIGN_YOUR_STEPS:
        return ays_sigmas(steps)
    return sigmas
