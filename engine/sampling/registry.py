"""Sampler names: A1111 labels and diffusers class names, each with its defaults and builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from . import discrete, karras, multistep
from .config import AlgorithmType, SchedulerConfig
from .plan import Plan


class Algorithm(str, Enum):
    DDIM = "ddim"
    DDPM = "ddpm"
    PNDM = "pndm"
    LCM = "lcm"
    LMS = "lms"
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    HEUN = "heun"
    DPM2 = "dpm2"
    DPM2_ANCESTRAL = "dpm2_ancestral"
    DPMPP_SDE = "dpmpp_sde"
    DPMPP_2S_ANCESTRAL = "dpmpp_2s_ancestral"
    DPM_MULTISTEP = "dpm_multistep"
    DPMPP_3M_SDE = "dpmpp_3m_sde"
    UNIPC = "unipc"
    DEIS = "deis"


def _keys(*groups: dict[str, Any], **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in groups:
        out.update(group)
    out.update(more)
    return out


_BASE = _keys(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None
)
_SD = _keys(_BASE, beta_start=0.00085, beta_end=0.012)
_EPS = {"prediction_type": "epsilon"}
_THRESH = _keys(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_CLIP = _keys(clip_sample=True, clip_sample_range=1.0)
_SIGMAS = _keys(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_SPACE = _keys(timestep_spacing="linspace", steps_offset=0)
_LEADING = _keys(timestep_spacing="leading", steps_offset=0)
_ZSNR = {"rescale_betas_zero_snr": False}
_FLOW = _keys(
    use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential"
)
_MULTI = _keys(_BASE, _EPS, _THRESH, _SIGMAS, _FLOW, _SPACE, solver_order=2, lower_order_final=True)
_EULER = _keys(
    _BASE,
    _EPS,
    _SIGMAS,
    _SPACE,
    _ZSNR,
    interpolation_type="linear",
    sigma_min=None,
    sigma_max=None,
    timestep_type="discrete",
    final_sigmas_type="zero",
)

# The __init__ defaults of each diffusers class (0.42): the keys it takes from a config.
_DEFAULTS: dict[Algorithm, dict[str, Any]] = {
    Algorithm.DDIM: _keys(_BASE, _EPS, _THRESH, _CLIP, _LEADING, _ZSNR, set_alpha_to_one=True, eta=0.0),
    Algorithm.DDPM: _keys(_BASE, _EPS, _THRESH, _CLIP, _LEADING, _ZSNR, variance_type="fixed_small"),
    Algorithm.PNDM: _keys(_BASE, _EPS, _LEADING, skip_prk_steps=False, set_alpha_to_one=False),
    Algorithm.LCM: _keys(
        _SD,
        _EPS,
        _THRESH,
        _CLIP,
        _LEADING,
        _ZSNR,
        beta_schedule="scaled_linear",
        clip_sample=False,
        original_inference_steps=50,
        set_alpha_to_one=True,
        timestep_scaling=10.0,
    ),
    Algorithm.LMS: _keys(_BASE, _EPS, _SIGMAS, _SPACE),
    Algorithm.EULER: _EULER,
    Algorithm.EULER_ANCESTRAL: _keys(_BASE, _EPS, _SPACE, _ZSNR),
    Algorithm.HEUN: _keys(_SD, _EPS, _SIGMAS, _CLIP, _SPACE, clip_sample=False),
    Algorithm.DPM2: _keys(_SD, _EPS, _SIGMAS, _SPACE),
    Algorithm.DPM2_ANCESTRAL: _keys(_SD, _EPS, _SIGMAS, _SPACE),
    Algorithm.DPMPP_SDE: _keys(_SD, _EPS, _SIGMAS, _SPACE, noise_sampler_seed=None),
    Algorithm.DPMPP_2S_ANCESTRAL: _keys(_EULER, eta=1.0),
    Algorithm.DPMPP_3M_SDE: _keys(_EULER, eta=1.0),
    Algorithm.DPM_MULTISTEP: _keys(
        _MULTI,
        _ZSNR,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        euler_at_final=False,
        use_lu_lambdas=False,
        final_sigmas_type="zero",
        lambda_min_clipped=float("-inf"),
        variance_type=None,
    ),
    Algorithm.UNIPC: _keys(
        _MULTI,
        _ZSNR,
        predict_x0=True,
        solver_type="bh2",
        disable_corrector=(),
        solver_p=None,
        final_sigmas_type="zero",
        sigma_min=None,
        sigma_max=None,
        shift_terminal=None,
    ),
    Algorithm.DEIS: _keys(_MULTI, algorithm_type="deis", solver_type="logrho"),
}
DEFAULTS: dict[Algorithm, Mapping[str, Any]] = {a: MappingProxyType(d) for a, d in _DEFAULTS.items()}

_BUILDERS: dict[Algorithm, Callable[[SchedulerConfig, int, int], Plan]] = {
    Algorithm.DDIM: discrete.build_ddim,
    Algorithm.DDPM: discrete.build_ddpm,
    Algorithm.PNDM: discrete.build_pndm,
    Algorithm.LCM: discrete.build_lcm,
    Algorithm.LMS: karras.build_lms,
    Algorithm.EULER: karras.build_euler,
    Algorithm.EULER_ANCESTRAL: karras.build_euler_ancestral,
    Algorithm.HEUN: karras.build_heun,
    Algorithm.DPM2: karras.build_dpm2,
    Algorithm.DPM2_ANCESTRAL: karras.build_dpm2_ancestral,
    Algorithm.DPMPP_SDE: karras.build_dpmpp_sde,
    Algorithm.DPMPP_2S_ANCESTRAL: karras.build_dpmpp_2s_ancestral,
    Algorithm.DPM_MULTISTEP: multistep.build_dpm_multistep,
    Algorithm.DPMPP_3M_SDE: multistep.build_dpmpp_3m_sde,
    Algorithm.UNIPC: multistep.build_unipc,
    Algorithm.DEIS: multistep.build_deis,
}
_TWO_STAGE = {
    Algorithm.HEUN,
    Algorithm.DPM2,
    Algorithm.DPM2_ANCESTRAL,
    Algorithm.DPMPP_SDE,
    Algorithm.DPMPP_2S_ANCESTRAL,
}
_STOCHASTIC = {
    Algorithm.DDPM,
    Algorithm.LCM,
    Algorithm.EULER_ANCESTRAL,
    Algorithm.DPM2_ANCESTRAL,
    Algorithm.DPMPP_SDE,
}
_ETA = {Algorithm.DDIM, Algorithm.DPMPP_2S_ANCESTRAL, Algorithm.DPMPP_3M_SDE}
_DISCRETE = {Algorithm.DDIM, Algorithm.DDPM, Algorithm.PNDM, Algorithm.LCM}
_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_ays_sigmas")  # engine-wide
_SCHEDULE_KEYS = (*_SCHEDULE_FLAGS, "use_lu_lambdas")  # a label sets all of them
_SCHEDULE_SUFFIX = {
    "": None,
    " Karras": "use_karras_sigmas",
    " Exponential": "use_exponential_sigmas",
    " AYS": "use_ays_sigmas",
}


@dataclass(frozen=True)
class Sampler:
    """A named sampler: its algorithm and the settings its name implies."""

    name: str
    algorithm: Algorithm
    diffusers_class: str | None
    forced: Mapping[str, Any] = field(default_factory=dict)

    @property
    def defaults(self) -> Mapping[str, Any]:
        return DEFAULTS[self.algorithm]

    @property
    def extensions(self) -> frozenset[str]:
        """Engine-only settings a label or an override may set (never a config file)."""
        eta = {"eta"} if self.algorithm in _ETA else set()
        return frozenset(eta if self.algorithm in _DISCRETE else eta | set(_SCHEDULE_FLAGS))

    @property
    def order(self) -> int:
        return 2 if self.algorithm in _TWO_STAGE else 1

    def build(self, cfg: SchedulerConfig, steps: int, begin: int) -> Plan:
        return _BUILDERS[self.algorithm](cfg, steps, begin)

    def stochastic(self, cfg: SchedulerConfig) -> bool:
        if self.algorithm in _ETA:
            return cfg.eta > 0
        if self.algorithm is Algorithm.DPM_MULTISTEP:
            return cfg.algorithm_type is AlgorithmType.SDE_DPMSOLVER_PP
        return self.algorithm in _STOCHASTIC


CLASSES = {
    "DDIMScheduler": Algorithm.DDIM,
    "DDPMScheduler": Algorithm.DDPM,
    "PNDMScheduler": Algorithm.PNDM,
    "LCMScheduler": Algorithm.LCM,
    "LMSDiscreteScheduler": Algorithm.LMS,
    "EulerDiscreteScheduler": Algorithm.EULER,
    "EulerAncestralDiscreteScheduler": Algorithm.EULER_ANCESTRAL,
    "HeunDiscreteScheduler": Algorithm.HEUN,
    "KDPM2DiscreteScheduler": Algorithm.DPM2,
    "KDPM2AncestralDiscreteScheduler": Algorithm.DPM2_ANCESTRAL,
    "DPMSolverSDEScheduler": Algorithm.DPMPP_SDE,
    "DPMSolverMultistepScheduler": Algorithm.DPM_MULTISTEP,
    "UniPCMultistepScheduler": Algorithm.UNIPC,
    "DEISMultistepScheduler": Algorithm.DEIS,
}
_CLASS_OF = {a: c for c, a in CLASSES.items()}
_FIXED_LABELS = {"DDIM": Algorithm.DDIM, "DDPM": Algorithm.DDPM, "PNDM": Algorithm.PNDM, "LCM": Algorithm.LCM}
_SCHEDULABLE: dict[str, tuple[Algorithm, dict[str, Any]]] = {
    "LMS": (Algorithm.LMS, {}),
    "Euler": (Algorithm.EULER, {}),
    "Euler a": (Algorithm.EULER_ANCESTRAL, {}),
    "Heun": (Algorithm.HEUN, {}),
    "DPM2": (Algorithm.DPM2, {}),
    "DPM2 a": (Algorithm.DPM2_ANCESTRAL, {}),
    "DPM++ 2M": (Algorithm.DPM_MULTISTEP, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": (Algorithm.DPM_MULTISTEP, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": (Algorithm.DPMPP_SDE, {}),
    "DPM++ 2S a": (Algorithm.DPMPP_2S_ANCESTRAL, {}),
    "DPM++ 3M SDE": (Algorithm.DPMPP_3M_SDE, {}),
    "UniPC": (Algorithm.UNIPC, {}),
    "DEIS": (Algorithm.DEIS, {}),
}


def _catalogue() -> dict[str, Sampler]:
    out = {n: Sampler(n, a, _CLASS_OF.get(a)) for n, a in _FIXED_LABELS.items()}
    for base, (algorithm, forced) in _SCHEDULABLE.items():
        for suffix, flag in _SCHEDULE_SUFFIX.items():
            flags = {key: key == flag for key in _SCHEDULE_KEYS}
            out[base + suffix] = Sampler(
                base + suffix, algorithm, _CLASS_OF.get(algorithm), {**forced, **flags}
            )
    out.update({c: Sampler(c, a, c) for c, a in CLASSES.items()})
    return out


SAMPLERS: dict[str, Sampler] = _catalogue()


def _key(name: str) -> str:
    return " ".join(name.lower().split())


_BY_KEY = {_key(n): s for n, s in SAMPLERS.items()}


def resolve(name: str) -> str:
    """The canonical name of a sampler: case and runs of whitespace are ignored
    (" euler  A " -> "Euler a"); an unknown name raises a one-line ValueError listing the valid ones."""
    sampler = _BY_KEY.get(_key(name)) if isinstance(name, str) else None
    if sampler is None:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return sampler.name


def a1111_label(class_name: str, config: Mapping[str, Any]) -> str | None:
    """The A1111 label that runs what the diffusers scheduler ``class_name`` runs with ``config`` (every
    setting the label forces equals the config's, an absent sigma-schedule flag counting as false):
    EulerDiscreteScheduler with plain sigmas is "Euler". None when no label does (e.g. a config setting
    a solver a label would change)."""
    algorithm = CLASSES.get(class_name)
    for name, sampler in SAMPLERS.items():
        if sampler.algorithm is not algorithm or name in CLASSES:
            continue
        unset = {key: False for key in _SCHEDULE_KEYS}
        if all({**unset, **config}.get(key) == value for key, value in sampler.forced.items()):
            return name
    return None


def lookup(name: str) -> Sampler:
    """The sampler called ``name``, resolved by :func:`resolve`."""
    return SAMPLERS[resolve(name)]
