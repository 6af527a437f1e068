"""Scheduler settings: a diffusers ``scheduler_config.json`` resolved against one sampler's defaults."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any


class BetaSchedule(str, Enum):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"
    SQUAREDCOS_CAP_V2 = "squaredcos_cap_v2"


class Prediction(str, Enum):
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


class Spacing(str, Enum):
    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


class FinalSigmas(str, Enum):
    ZERO = "zero"
    SIGMA_MIN = "sigma_min"


class SigmaSchedule(str, Enum):
    """How the sigma ladder is spaced once the training sigmas are known."""

    DEFAULT = "default"
    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    LU_LAMBDAS = "lu_lambdas"
    ALIGN_YOUR_STEPS = "align_your_steps"


class TimestepType(str, Enum):
    DISCRETE = "discrete"
    CONTINUOUS = "continuous"


class VarianceType(str, Enum):
    FIXED_SMALL = "fixed_small"
    FIXED_SMALL_LOG = "fixed_small_log"
    FIXED_LARGE = "fixed_large"


class AlgorithmType(str, Enum):
    DPMSOLVER_PP = "dpmsolver++"
    SDE_DPMSOLVER_PP = "sde-dpmsolver++"
    DEIS = "deis"


class SolverType(str, Enum):
    MIDPOINT = "midpoint"
    HEUN = "heun"
    BH1 = "bh1"
    BH2 = "bh2"
    LOGRHO = "logrho"


@dataclass(frozen=True)
class SchedulerConfig:
    """Every setting any sampler reads; fields a sampler does not know keep these values."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = BetaSchedule.LINEAR
    trained_betas: tuple[float, ...] | None = None
    prediction_type: Prediction = Prediction.EPSILON
    timestep_spacing: Spacing = Spacing.LEADING
    steps_offset: int = 0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    sigma_schedule: SigmaSchedule = SigmaSchedule.DEFAULT
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: FinalSigmas = FinalSigmas.ZERO
    timestep_type: TimestepType = TimestepType.DISCRETE
    solver_order: int = 2
    algorithm_type: AlgorithmType = AlgorithmType.DPMSOLVER_PP
    solver_type: SolverType = SolverType.MIDPOINT
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    disable_corrector: tuple[int, ...] = ()
    skip_prk_steps: bool = False
    variance_type: VarianceType = VarianceType.FIXED_SMALL
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    eta: float = 0.0


# diffusers keys whose only supported value is the one given: anything else raises.
_FIXED = {
    "thresholding": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "predict_x0": True,
    "solver_p": None,
    "interpolation_type": "linear",
}
# diffusers keys that choose the sigma ladder; at most one may be true.
_SCHEDULE_FLAGS = {
    "use_karras_sigmas": SigmaSchedule.KARRAS,
    "use_exponential_sigmas": SigmaSchedule.EXPONENTIAL,
    "use_lu_lambdas": SigmaSchedule.LU_LAMBDAS,
    "use_ays_sigmas": SigmaSchedule.ALIGN_YOUR_STEPS,
}
# Keys that describe the model's training schedule rather than a sampler: every sampler takes them
# from a config, also where its diffusers class ignores them (LMS, Heun, KDPM2, DPM++ SDE, PNDM and
# DEIS drop rescale_betas_zero_snr, which would sample a zero-terminal-SNR model on the wrong ladder).
MODEL_KEYS = frozenset({"rescale_betas_zero_snr"})
_FIELDS = {f.name for f in fields(SchedulerConfig)}
_ENUM_TYPES = {
    "beta_schedule": BetaSchedule,
    "prediction_type": Prediction,
    "timestep_spacing": Spacing,
    "final_sigmas_type": FinalSigmas,
    "timestep_type": TimestepType,
    "variance_type": VarianceType,
    "algorithm_type": AlgorithmType,
    "solver_type": SolverType,
}


def resolve_config(
    defaults: Mapping[str, Any],
    extensions: Iterable[str],
    config: Mapping[str, Any] | None,
    forced: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> SchedulerConfig:
    """Merge like ``Class.from_config(config, **overrides)``: keys the class does not take are ignored.

    ``config`` may only set keys of ``defaults`` (the diffusers class signature) and ``MODEL_KEYS``;
    ``forced`` (what a sampler label implies) and ``overrides`` may also set ``extensions``
    (engine-only options).
    """
    known = set(defaults) | MODEL_KEYS
    merged = dict(defaults)
    merged.update({k: v for k, v in (config or {}).items() if k in known})
    known |= set(extensions)
    merged.update({k: v for k, v in forced.items() if k in known})
    merged.update({k: v for k, v in overrides.items() if k in known})
    return _to_config(merged)


def _to_config(merged: dict[str, Any]) -> SchedulerConfig:
    for key, allowed in _FIXED.items():
        value = merged.pop(key, allowed)
        if value != allowed and not (allowed is None and not value):
            raise ValueError(f"{key}={value!r} is not supported (only {allowed!r})")
    chosen = [s for flag, s in _SCHEDULE_FLAGS.items() if merged.pop(flag, False)]
    if len(chosen) > 1:
        raise ValueError(f"only one sigma schedule may be chosen, got {[s.value for s in chosen]}")
    if chosen:
        merged["sigma_schedule"] = chosen[0]
    if merged.get("variance_type") is None:
        merged.pop("variance_type", None)
    for key, enum in _ENUM_TYPES.items():
        if key in merged:
            merged[key] = _enum(enum, key, merged[key])
    for key in ("trained_betas", "disable_corrector"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    merged = {k: v for k, v in merged.items() if k in _FIELDS}
    cfg = SchedulerConfig(**merged)
    _check_numbers(cfg)
    return cfg


def _enum(enum: type[Enum], key: str, value: Any) -> Enum:
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"unknown {key} {value!r}; valid: {valid}") from None


def _check_numbers(cfg: SchedulerConfig) -> None:
    if not isinstance(cfg.num_train_timesteps, int) or cfg.num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {cfg.num_train_timesteps!r}")
    if cfg.trained_betas is not None and len(cfg.trained_betas) != cfg.num_train_timesteps:
        raise ValueError(
            f"trained_betas has {len(cfg.trained_betas)} entries, num_train_timesteps is "
            f"{cfg.num_train_timesteps}"
        )
    if cfg.solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {cfg.solver_order!r}")
    if not cfg.eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {cfg.eta!r}")
    if cfg.trained_betas is None and not 0.0 < cfg.beta_start <= cfg.beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {cfg.beta_start!r}, {cfg.beta_end!r}")


# -- outdated configs -----------------------------------------------------------------------------

# (key, the value diffusers' StableDiffusionPipeline.__init__ rewrites, the value it writes): it
# checks ``getattr(scheduler.config, "steps_offset", 1) != 1`` and ``getattr(..., "clip_sample",
# False) is True`` (diffusers 0.42, pipelines/stable_diffusion/pipeline_stable_diffusion.py; the
# img2img and inpainting pipelines do the same), each with a deprecation warning.
_MIGRATIONS: tuple[tuple[str, Callable[[Any], bool], Any], ...] = (
    ("steps_offset", lambda v: v != 1, 1),
    ("clip_sample", lambda v: v is True, False),
)


def migrate_scheduler_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The scheduler config diffusers' StableDiffusionPipeline samples with, and one line per change.

    diffusers rewrites outdated scheduler configs when it builds the pipeline: ``steps_offset`` other
    than 1 becomes 1 and ``clip_sample`` true becomes false. It reads the scheduler object's config,
    where a key the file leaves out holds the class default (``_class_name``): a DDIMScheduler file
    without ``steps_offset`` / ``clip_sample`` means 0 / true and is rewritten too; for a class the
    engine does not know, only keys the file sets count. Returns a new dict (the input is not
    changed) with the rewritten keys set explicitly, and for each change a line naming the key, the
    old and the new value, e.g. "scheduler steps_offset: 0 -> 1 (...)".
    """
    from .registry import CLASSES, DEFAULTS  # registry imports this module

    algorithm = CLASSES.get(str(config.get("_class_name")))
    class_defaults = DEFAULTS[algorithm] if algorithm is not None else {}
    migrated = dict(config)
    notes = []
    for key, outdated, new in _MIGRATIONS:
        if key in config:
            old, shown = config[key], json.dumps(config[key], default=str)
        elif key in class_defaults:
            old = class_defaults[key]
            shown = f"unset ({config['_class_name']} default {json.dumps(old, default=str)})"
        else:
            continue
        if outdated(old):
            migrated[key] = new
            notes.append(
                f"scheduler {key}: {shown} -> {json.dumps(new)} (an outdated scheduler_config.json; "
                "diffusers' StableDiffusionPipeline makes the same change)"
            )
    return migrated, tuple(notes)
