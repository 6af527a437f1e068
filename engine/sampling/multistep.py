"""Multistep solvers over the denoised estimates of earlier evaluations: DPM-Solver++ (2M, 3M, 2M SDE),
UniPC and DEIS as diffusers implements them (variance-preserving samples, integer timesteps), and
k-diffusion's DPM++ 3M SDE on a Karras ladder.

History: evaluation ``i`` reads the denoised estimates (and, for DEIS, the samples) of evaluations
``i - 1`` and ``i - 2``; the solver order warms up over the evaluations of this run, as diffusers'
``lower_order_nums`` does.
"""

from __future__ import annotations

import math

import numpy as np

from .config import AlgorithmType, BetaSchedule, FinalSigmas, SchedulerConfig, SigmaSchedule, SolverType
from .karras import RULES, Eval, karras_plan
from .parameterization import make_denoiser, vp_of_sigma
from .plan import Plan, Source, Update, terms
from .schedules import (
    Ladder,
    alphas_cumprod,
    multistep_timesteps,
    respace,
    sigma_ladder,
    sigma_to_t,
    training_sigmas,
)

X, D, N = Source.SAMPLE, Source.DENOISED, Source.NOISE
IDENTITY = Update(terms((X, 0, 1.0)))


def multistep_ladder(cfg: SchedulerConfig, steps: int, solver: str) -> Ladder:
    """Integer timesteps and sigmas of DPM-Solver ("dpm"), UniPC ("unipc") or DEIS ("deis")."""
    acp = alphas_cumprod(cfg, terminal_floor=True)
    train = training_sigmas(acp)
    log_sigmas = np.log(train)
    last = last_timestep(cfg, solver)
    ts = multistep_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, steps, cfg.steps_offset, last)
    kind = cfg.sigma_schedule
    if kind is SigmaSchedule.DEFAULT:
        sigmas = np.interp(ts, np.arange(len(train)), train)
    else:
        lo = cfg.sigma_min if cfg.sigma_min is not None else train[0]
        hi = cfg.sigma_max if cfg.sigma_max is not None else train[-1]
        sigmas = respace(kind, lo, hi, steps, train)
        t = sigma_to_t(sigmas, log_sigmas)
        rounded = kind is not SigmaSchedule.EXPONENTIAL
        if solver == "dpm" and cfg.beta_schedule is BetaSchedule.SQUAREDCOS_CAP_V2:
            rounded = False
        ts = (t.round() if rounded else t).astype(np.int64)
    return Ladder(ts, np.append(sigmas, _final_sigma(cfg, solver, sigmas, train)), log_sigmas, acp)


def last_timestep(cfg: SchedulerConfig, solver: str) -> int:
    """One past the highest timestep the ladder may use: DPM-Solver's ``lambda_min_clipped`` drops
    the training timesteps whose log-SNR lies below it (diffusers' ``last_timestep``)."""
    last = cfg.num_train_timesteps
    if solver == "dpm" and cfg.lambda_min_clipped > -math.inf:
        acp = alphas_cumprod(cfg, terminal_floor=True)
        lambdas = 0.5 * np.log(acp) - 0.5 * np.log(1 - acp)
        last -= int(np.searchsorted(lambdas[::-1], cfg.lambda_min_clipped))
    return last


def _final_sigma(cfg: SchedulerConfig, solver: str, sigmas: np.ndarray, train: np.ndarray) -> float:
    respaced = cfg.sigma_schedule is not SigmaSchedule.DEFAULT
    if solver == "deis":
        return float(sigmas[-1] if respaced else train[0])
    if cfg.final_sigmas_type is FinalSigmas.ZERO:
        return 0.0
    return float(sigmas[-1] if respaced and solver == "unipc" else train[0])


def vp_plan(cfg: SchedulerConfig, lad: Ladder, updates: list[Update], begin: int) -> Plan:
    alpha, sigma = vp_of_sigma(lad.sigmas[:-1])
    return Plan(
        timesteps=lad.timesteps[begin:],
        init_noise_sigma=1.0,
        input_scale=np.ones(len(alpha) - begin),
        denoiser=make_denoiser(cfg.prediction_type, alpha, sigma).tail(begin),
        updates=tuple(updates),
        noise_scale=np.stack([alpha, sigma], axis=1)[begin:],
        order=1,
    )


def _lam(s: float) -> float:
    """log(alpha / sigma) of the VP process at Karras level s: -log(s)."""
    return math.inf if s == 0 else -math.log(s)


def from_differences(order: int, r0: float, r1: float, c0: float, c1: float, c2: float) -> list[float]:
    """Weights on x0_i, x0_i-1, x0_i-2 of c0 * D0 + c1 * D1 + c2 * D2, with D1, D2 the
    divided differences of DPM-Solver++ (Lu et al. 2022b, alg. 2 and its third-order form)."""
    if order == 1:
        return [c0]
    if order == 2:
        return [c0 + c1 / r0, -c1 / r0]
    q = r0 / (r0 + r1)
    cu = c1 * (1 + q) + c2 / (r0 + r1)
    cw = -c1 * q - c2 / (r0 + r1)
    return [c0 + cu / r0, -cu / r0 + cw / r1, -cw / r1]


def _warm_order(cfg: SchedulerConfig, k: int, i: int, n: int, final_first: bool) -> int:
    """diffusers' order choice at absolute step k, the i-th of this run, of n steps."""
    short = cfg.lower_order_final and n < 15
    if cfg.solver_order == 1 or i < 1 or (k == n - 1 and (final_first or short)):
        return 1
    if cfg.solver_order == 2 or i < 2 or (k == n - 2 and short):
        return 2
    return 3


def dpmpp_update(cfg: SchedulerConfig, s: np.ndarray, k: int, order: int) -> Update:
    """DPM-Solver++ multistep (Lu et al. 2022b) and its SDE variant, in VP form, as in diffusers."""
    sde = cfg.algorithm_type is AlgorithmType.SDE_DPMSOLVER_PP
    (alpha_t,), (sig_t,) = vp_of_sigma(np.array([s[k + 1]]))
    sig_s = float(vp_of_sigma(np.array([s[k]]))[1][0])
    h = _lam(s[k + 1]) - _lam(s[k])
    if h == 0:
        return Update(IDENTITY.out, (), sde)
    hs = 2 * h if sde else h
    c0 = -alpha_t * math.expm1(-hs)
    c1 = c2 = 0.0
    if order > 1:
        c1 = alpha_t * (math.expm1(-hs) / hs + 1)
        if order == 2 and cfg.solver_type is SolverType.MIDPOINT:
            c1 = 0.5 * c0
        c2 = (
            alpha_t * ((-math.expm1(-hs) - hs) / hs**2 - 0.5)
            if sde
            else -alpha_t * ((math.expm1(-h) + h) / h**2 - 0.5)
        )
    r0 = (_lam(s[k]) - _lam(s[k - 1])) / h if order > 1 else 1.0
    r1 = (_lam(s[k - 1]) - _lam(s[k - 2])) / h if order > 2 else 1.0
    weights = from_differences(order, r0, r1, c0, c1, c2)
    x_coef = sig_t / sig_s * (math.exp(-h) if sde else 1.0)
    noise = ((N, 0, sig_t * math.sqrt(-math.expm1(-2 * h))),) if sde else ()
    return Update(terms((X, 0, x_coef), *((D, j, w) for j, w in enumerate(weights)), *noise), (), sde)


def build_dpm_multistep(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DPM++ 2M / 3M (solver_order) and 2M SDE, diffusers' DPMSolverMultistepScheduler."""
    lad = multistep_ladder(cfg, steps, "dpm")
    final_first = cfg.euler_at_final or cfg.final_sigmas_type is FinalSigmas.ZERO
    updates = [
        dpmpp_update(cfg, lad.sigmas, k, _warm_order(cfg, k, k - begin, steps, final_first))
        for k in range(begin, steps)
    ]
    return vp_plan(cfg, lad, updates, begin)


def unipc_rhos(rks: np.ndarray, hh: float, order: int, bh1: bool, predictor: bool) -> np.ndarray:
    """UniPC's rho weights (Zhao et al. 2023, alg. 2-3): solve R rho = b over phi-function moments."""
    if predictor and order <= 2:
        return np.full(order - 1, 0.5)
    if not predictor and order == 1:
        return np.array([0.5])
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = hh if bh1 else math.expm1(hh)
    factorial, rows, b = 1, [], []
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    rmat, bvec = np.array(rows), np.array(b)
    return np.linalg.solve(rmat[:-1, :-1], bvec[:-1]) if predictor else np.linalg.solve(rmat, bvec)


def unipc_terms(cfg: SchedulerConfig, s: np.ndarray, k: int, order: int, lag: int) -> tuple:
    """UniPC from level s[k] to s[k + 1] with x0 history; ``lag`` 1 gives the corrector, whose
    sample and history are one evaluation older and which also reads the current x0."""
    (alpha_t,), (sig_t,) = vp_of_sigma(np.array([s[k + 1]]))
    sig_s = float(vp_of_sigma(np.array([s[k]]))[1][0])
    h = _lam(s[k + 1]) - _lam(s[k])
    if h == 0:
        return ((X, lag, 1.0),)
    hh = -h
    corrector = lag == 1
    rks = np.array([(_lam(s[k - j]) - _lam(s[k])) / h for j in range(1, order)] + [1.0])
    rhos = (
        unipc_rhos(rks, hh, order, cfg.solver_type is SolverType.BH1, not corrector)
        if order > 1 or corrector
        else []
    )
    b_h = hh if cfg.solver_type is SolverType.BH1 else math.expm1(hh)
    scale = alpha_t * b_h
    parts = [(X, lag, sig_t / sig_s), (D, lag, -alpha_t * math.expm1(hh))]
    for j in range(1, order):
        w = scale * rhos[j - 1] / rks[j - 1]
        parts += [(D, lag + j, -w), (D, lag, w)]
    if corrector:
        parts += [(D, 0, -scale * rhos[-1]), (D, lag, scale * rhos[-1])]
    return tuple(parts)


def build_unipc(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """UniPC-p with the UniC corrector (bh1 / bh2), diffusers' UniPCMultistepScheduler."""
    lad = multistep_ladder(cfg, steps, "unipc")
    s = lad.sigmas
    updates, previous = [], 0
    for k in range(begin, steps):
        i = k - begin
        order = min(cfg.solver_order, steps - k) if cfg.lower_order_final else cfg.solver_order
        order = min(order, min(i, cfg.solver_order) + 1)
        corrects = i > 0 and (k - 1) not in cfg.disable_corrector
        correction = terms(*unipc_terms(cfg, s, k - 1, previous, 1)) if corrects else ()
        updates.append(Update(terms(*unipc_terms(cfg, s, k, order, 0)), correction))
        previous = order
    return vp_plan(cfg, lad, updates, begin)


def _deis_weights(rho: list[float], order: int) -> list[float]:
    """DEIS log-rho multistep weights on eps of this and earlier evaluations (Zhang & Chen 2022)."""
    lg = [math.log(r) for r in rho]  # log rho_t, log rho_s0, log rho_s1, log rho_s2

    def ind2(t: int, b: int, c: int) -> float:
        return rho[t] * (-lg[c] + lg[t] - 1) / (lg[b] - lg[c])

    def ind3(t: int, b: int, c: int, d: int) -> float:
        num = lg[c] * (lg[d] - lg[t] + 1) - lg[d] * lg[t] + lg[d] + lg[t] ** 2 - 2 * lg[t] + 2
        return rho[t] * num / ((lg[b] - lg[c]) * (lg[b] - lg[d]))

    if order == 2:
        return [ind2(0, 1, 2) - ind2(1, 1, 2), ind2(0, 2, 1) - ind2(1, 2, 1)]
    return [
        ind3(0, 1, 2, 3) - ind3(1, 1, 2, 3),
        ind3(0, 2, 3, 1) - ind3(1, 2, 3, 1),
        ind3(0, 3, 1, 2) - ind3(1, 3, 1, 2),
    ]


def deis_update(s: np.ndarray, k: int, order: int) -> Update:
    """DEIS step from s[k] to s[k + 1]; eps of evaluation k - j is (x - alpha x0) / sigma there."""
    alpha, sigma = vp_of_sigma(s)
    if order == 1:
        h = _lam(s[k + 1]) - _lam(s[k])
        x_coef, weights = alpha[k + 1] / alpha[k], [-sigma[k + 1] * math.expm1(h)]
    else:
        rho = [s[k + 1], *(s[k - j] for j in range(order))]
        x_coef = alpha[k + 1] / alpha[k]
        weights = [alpha[k + 1] * w for w in _deis_weights(rho, order)]
    parts = [(X, 0, x_coef)]
    for j, w in enumerate(weights):
        parts += [(X, j, w / sigma[k - j]), (D, j, -w * alpha[k - j] / sigma[k - j])]
    return Update(terms(*parts))


def build_deis(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DEIS multistep, diffusers' DEISMultistepScheduler (it ends at sigma_min, not zero)."""
    if cfg.algorithm_type is not AlgorithmType.DEIS or cfg.solver_type is not SolverType.LOGRHO:
        raise ValueError("DEIS supports algorithm_type 'deis' with solver_type 'logrho' only")
    lad = multistep_ladder(cfg, steps, "deis")
    updates = [
        deis_update(lad.sigmas, k, _warm_order(cfg, k, k - begin, steps, False)) for k in range(begin, steps)
    ]
    return vp_plan(cfg, lad, updates, begin)


def build_dpmpp_3m_sde(cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``) on a Karras ladder, eta = cfg.eta."""
    lad = sigma_ladder(cfg, steps, RULES)
    s = lad.sigmas
    evals = []
    for k in range(steps):
        i = k - begin
        if s[k + 1] == 0:
            evals.append(Eval(lad.timesteps[k], s[k], Update(terms((D, 0, 1.0)))))
            continue
        h = math.log(s[k] / s[k + 1])
        he = h * (cfg.eta + 1)
        phi2 = math.expm1(-he) / he + 1
        order = min(i, 2) + 1 if k >= 1 else 1
        r0 = math.log(s[k - 1] / s[k]) / h if order > 1 else 1.0
        r1 = math.log(s[k - 2] / s[k - 1]) / h if order > 2 else 1.0
        weights = from_differences(order, r0, r1, -math.expm1(-he), phi2, -(phi2 / he - 0.5))
        noise = s[k + 1] * math.sqrt(-math.expm1(-2 * h * cfg.eta)) if cfg.eta else 0.0
        parts = [(X, 0, math.exp(-he)), *((D, j, w) for j, w in enumerate(weights)), (N, 0, noise)]
        evals.append(Eval(lad.timesteps[k], s[k], Update(terms(*parts), (), noise > 0)))
    return karras_plan(cfg, lad, evals, begin, 1)
