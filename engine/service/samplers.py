"""A1111's sampler and scheduler names over the engine's samplers (A1111 1.9 split "DPM++ 2M" +
"Karras" and the older combined "DPM++ 2M Karras"), and the /samplers and /schedulers listings.

A1111's "automatic" scheduler keeps what the sampler name says (a combined name's schedule, else the
sampler's own default, which in this engine is diffusers'); A1111 1.9+ instead gives some samplers a
Karras or exponential default. "uniform" is the sampler's default spacing. The aliases are A1111's
k-diffusion style names, learnt from its API docs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import RequestError
from engine.sampling.registry import resolve

# Base samplers with their A1111 aliases (the names /samplers lists, and that requests may use).
ALIASES: Mapping[str, tuple[str, ...]] = {
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2S a": ("k_dpmpp_2s_a",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "Euler": ("k_euler",),
    "LMS": ("k_lms",),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DDIM": ("ddim",),
    "DDPM": ("ddpm",),
    "PNDM": ("plms", "pndm"),
    "UniPC": ("unipc",),
    "LCM": ("k_lcm", "lcm"),
    "DEIS": ("deis",),
}
SCHEDULABLE = frozenset(name for name in ALIASES if name not in ("DDIM", "DDPM", "PNDM", "LCM"))


@dataclass(frozen=True)
class Schedule:
    name: str  # A1111's scheduler name
    label: str
    suffix: str | None  # appended to the base sampler name; None: keep the name as given
    default_rho: float = -1.0


SCHEDULES = (
    Schedule("automatic", "Automatic", None),
    Schedule("uniform", "Uniform", ""),
    Schedule("karras", "Karras", " Karras", 7.0),
    Schedule("exponential", "Exponential", " Exponential"),
    Schedule("align_your_steps", "Align Your Steps", " AYS"),
)
_SUFFIXES = tuple(s.suffix for s in SCHEDULES if s.suffix)
_BY_ALIAS = {alias.lower(): name for name, aliases in ALIASES.items() for alias in aliases}
_SCHEDULE_BY_KEY = {key.lower(): s for s in SCHEDULES for key in (s.name, s.label, (s.suffix or "").strip())}
_SCHEDULE_BY_KEY.pop("", None)
DEFAULT_SAMPLER = "Euler"  # A1111's API default when a request names none


def samplers_listing() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's shape, one entry per base sampler."""
    return [{"name": name, "aliases": list(aliases), "options": {}} for name, aliases in ALIASES.items()]


def schedulers_listing() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: A1111's shape."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": None,
            "default_rho": s.default_rho,
            "need_inner_model": False,
        }
        for s in SCHEDULES
    ]


def _canonical(name: str, field: str) -> str:
    name = _BY_ALIAS.get(" ".join(name.lower().split()), name)
    try:
        return resolve(name)
    except ValueError:
        raise RequestError(
            f"{field}: unknown sampler {name!r}; GET /sdapi/v1/samplers lists the names"
        ) from None


def _schedule(scheduler: str | None) -> Schedule:
    if scheduler is None or not str(scheduler).strip():
        return SCHEDULES[0]
    found = _SCHEDULE_BY_KEY.get(" ".join(str(scheduler).lower().split()))
    if found is None:
        names = ", ".join(s.name for s in SCHEDULES)
        raise RequestError(f"scheduler: unknown scheduler {scheduler!r}; valid: {names}")
    return found


def _split(canonical: str) -> tuple[str, str]:
    """("DPM++ 2M Karras") -> ("DPM++ 2M", " Karras"); ("Euler a") -> ("Euler a", "")."""
    for suffix in _SUFFIXES:
        if canonical.endswith(suffix) and canonical[: -len(suffix)] in SCHEDULABLE:
            return canonical[: -len(suffix)], suffix
    return canonical, ""


def resolve_sampler(sampler_name: str | None, sampler_index: str | None, scheduler: str | None) -> str:
    """The engine's sampler for an A1111 request: ``sampler_name`` wins over ``sampler_index`` (as in
    A1111), either may be an alias or a combined name; ``scheduler`` picks the schedule. Raises
    RequestError naming the field for an unknown name or a combined name that contradicts ``scheduler``."""
    field, name = ("sampler_name", sampler_name) if sampler_name else ("sampler_index", sampler_index)
    canonical = _canonical(name or DEFAULT_SAMPLER, field)
    schedule = _schedule(scheduler)
    if schedule.suffix is None:
        return canonical
    base, suffix = _split(canonical)
    if suffix and suffix != schedule.suffix:
        raise RequestError(
            f"scheduler: {field} {name!r} already names a schedule, which contradicts scheduler {scheduler!r}"
        )
    if schedule.suffix and base not in SCHEDULABLE:
        raise RequestError(f"scheduler: {base} takes no {schedule.label} schedule; use 'automatic'")
    return base + schedule.suffix
