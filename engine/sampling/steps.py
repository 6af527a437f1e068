"""Which step counts a sampler can run on a scheduler config, decided before any table is built.

Every sampler runs every count from 1 to ``num_train_timesteps`` on the configs SD 1.x / 2.x models
ship (leading, trailing or linspace spacing, steps_offset 0 or 1, v-prediction, zero terminal SNR),
including counts where diffusers fails; ``schedules`` says what runs there. A count is refused,
in one line naming the sampler, the count and the counts that do run, only where no sampling
schedule exists:

- LCM: more than ``original_inference_steps`` (its distillation schedule has no more timesteps);
- PNDM with ``skip_prk_steps`` false: fewer than 4 (the Runge-Kutta warm-up spans 4 timesteps);
- DPM-Solver / UniPC / DEIS on their own ladder where it repeats a timestep or has fewer than
  ``steps`` of them (only with ``lambda_min_clipped``, which leaves fewer training timesteps);
- DDIM / DDPM / LCM predicting epsilon on a zero-terminal-SNR schedule, at counts whose ladder
  includes the zero-SNR timestep (x0 = (x - eps) / sqrt(alpha_bar) divides by zero there; diffusers
  returns NaN);
- never, for configs a sampler cannot use at all (PNDM predicting the sample, LCM distilled on more
  timesteps than the model has, DEIS with another algorithm): "allowed: none".

The checks read integer timesteps only, so :func:`allowed_steps` over 1..1000 costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from engine.errors import RequestError

from .config import AlgorithmType, Prediction, SchedulerConfig, SigmaSchedule, SolverType
from .multistep import last_timestep
from .registry import Algorithm, Sampler
from .schedules import discrete_timesteps, lcm_timesteps, multistep_timesteps

Judge = Callable[[int], "str | None"]  # steps -> why that count cannot run, or None


def refusal(sampler: Sampler, cfg: SchedulerConfig, steps: int) -> str | None:
    """Why ``sampler`` cannot run ``steps`` (>= 1) steps on ``cfg``; None where it can."""
    return judge(sampler, cfg)(steps)


def allowed_steps(sampler: Sampler, cfg: SchedulerConfig) -> tuple[int, ...]:
    """Every step count in 1..num_train_timesteps that ``sampler`` runs on ``cfg``."""
    verdict = judge(sampler, cfg)
    return tuple(s for s in range(1, cfg.num_train_timesteps + 1) if verdict(s) is None)


def check_steps(sampler: Sampler, cfg: SchedulerConfig, steps: int) -> None:
    """Raise a one-line RequestError where ``sampler`` cannot run ``steps`` steps on ``cfg``."""
    verdict = judge(sampler, cfg)
    reason = verdict(steps)
    if reason is None:
        return
    allowed = (s for s in range(1, cfg.num_train_timesteps + 1) if verdict(s) is None)
    raise RequestError(
        f"sampler {sampler.name!r} cannot run {steps} steps on this model's scheduler config: {reason}; "
        f"allowed steps: {describe_counts(allowed)}"
    )


def describe_counts(counts: Iterable[int]) -> str:
    """Sorted step counts as ranges: "1..499, 501..998", or "none"."""
    runs: list[list[int]] = []
    for s in sorted(counts):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in runs) or "none"


def judge(sampler: Sampler, cfg: SchedulerConfig) -> Judge:
    """The per-count check of one sampler on one config (what does not depend on steps done once)."""
    config_reason = _config_refusal(sampler.algorithm, cfg)
    if config_reason is not None:
        return lambda steps: config_reason
    algorithm = sampler.algorithm
    if algorithm in (Algorithm.DDIM, Algorithm.DDPM):
        return lambda steps: _discrete(cfg, steps)
    if algorithm is Algorithm.PNDM:
        return lambda steps: _pndm(cfg, steps)
    if algorithm is Algorithm.LCM:
        return lambda steps: _lcm(cfg, steps)
    if algorithm in (Algorithm.DPM_MULTISTEP, Algorithm.UNIPC, Algorithm.DEIS):
        return _multistep_judge(algorithm, cfg)
    return lambda steps: None  # Karras-ladder samplers: every count has a ladder


def _config_refusal(algorithm: Algorithm, cfg: SchedulerConfig) -> str | None:
    if algorithm is Algorithm.PNDM and cfg.prediction_type is Prediction.SAMPLE:
        return "PNDM supports prediction_type 'epsilon' and 'v_prediction', not 'sample'"
    if algorithm is Algorithm.DEIS and (
        cfg.algorithm_type is not AlgorithmType.DEIS or cfg.solver_type is not SolverType.LOGRHO
    ):
        return "DEIS supports algorithm_type 'deis' with solver_type 'logrho' only"
    if algorithm is Algorithm.LCM and cfg.original_inference_steps > cfg.num_train_timesteps:
        return (
            f"original_inference_steps {cfg.original_inference_steps} exceeds num_train_timesteps "
            f"{cfg.num_train_timesteps}"
        )
    return None


def _zero_snr_epsilon(cfg: SchedulerConfig, top: int) -> str | None:
    """Epsilon prediction cannot give x0 at the zero-SNR timestep (alpha_bar = 0 exactly there)."""
    epsilon = cfg.prediction_type is Prediction.EPSILON
    if not (cfg.rescale_betas_zero_snr and epsilon and top == cfg.num_train_timesteps - 1):
        return None
    return (
        f"the ladder reaches timestep {top}, where rescale_betas_zero_snr makes the SNR zero and an "
        "epsilon prediction cannot denoise (zero SNR needs v_prediction)"
    )


def _ladder(ts: np.ndarray, steps: int, n_train: int) -> str | None:
    """Integer timesteps must be ``steps`` distinct, descending training timesteps."""
    if len(ts) != steps:
        return f"the timestep spacing gives {len(ts)} timesteps, not {steps}"
    if ts.min() < 0 or ts.max() > n_train - 1:
        return f"the timestep spacing leaves 0..{n_train - 1}"
    if np.any(np.diff(ts) >= 0):
        return "the timestep spacing repeats a timestep at this count"
    return None


def _discrete(cfg: SchedulerConfig, steps: int) -> str | None:
    n = cfg.num_train_timesteps
    ts = discrete_timesteps(cfg.timestep_spacing, n, steps, cfg.steps_offset)
    return _ladder(ts, steps, n) or _zero_snr_epsilon(cfg, int(ts.max()))


def _pndm(cfg: SchedulerConfig, steps: int) -> str | None:
    """PNDM floors alpha_bar at zero SNR (see ``build_pndm``), so only its ladder can fail."""
    if not cfg.skip_prk_steps and steps < 4:
        return "PNDM with skip_prk_steps=False needs at least 4 steps (its Runge-Kutta warm-up)"
    n = cfg.num_train_timesteps
    return _ladder(discrete_timesteps(cfg.timestep_spacing, n, steps, cfg.steps_offset), steps, n)


def _lcm(cfg: SchedulerConfig, steps: int) -> str | None:
    if steps > cfg.original_inference_steps:
        return f"LCM takes at most original_inference_steps={cfg.original_inference_steps} steps"
    ts = lcm_timesteps(cfg.num_train_timesteps, cfg.original_inference_steps, steps)
    return _zero_snr_epsilon(cfg, int(ts.max()))


def _multistep_judge(algorithm: Algorithm, cfg: SchedulerConfig) -> Judge:
    """DPM-Solver, UniPC, DEIS: their own ladder must not repeat a timestep (h = 0 divides)."""
    if cfg.sigma_schedule is not SigmaSchedule.DEFAULT:
        return lambda steps: None  # respaced sigmas are strictly decreasing at every count
    n = cfg.num_train_timesteps
    last = last_timestep(cfg, "dpm" if algorithm is Algorithm.DPM_MULTISTEP else "other")

    def verdict(steps: int) -> str | None:
        ts = multistep_timesteps(cfg.timestep_spacing, n, steps, cfg.steps_offset, last)
        return _ladder(ts, steps, n)

    return verdict
