"""A sampling run as data: per-evaluation linear updates, and the few lines that apply them.

Every sampler here is linear in the arrays it has seen: the sample, the model output and the
denoised estimate of this and earlier evaluations, and the injected noise. ``set_timesteps``
therefore compiles each evaluation ``i`` into a short tuple of ``Term(source, lag, coef)``, with
float64 coefficients, and ``step`` only evaluates ``sum(coef * source[i - lag])``. Arrays of earlier
evaluations live in a ``History`` keyed by evaluation index: no hidden step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .parameterization import Denoiser


class Source(str, Enum):
    SAMPLE = "sample"  # the sample given to step (after a correction, if the update has one)
    MODEL = "model"  # the raw model output
    DENOISED = "denoised"  # the denoised estimate x0
    NOISE = "noise"  # the standard-normal noise given to step


@dataclass(frozen=True)
class Term:
    source: Source
    lag: int
    coef: float


def terms(*items: tuple[Source, int, float]) -> tuple[Term, ...]:
    """Terms with equal (source, lag) merged and exact zeros dropped."""
    merged: dict[tuple[Source, int], float] = {}
    for source, lag, coef in items:
        merged[source, lag] = merged.get((source, lag), 0.0) + float(coef)
    out = tuple(Term(s, lag, c) for (s, lag), c in merged.items() if c != 0.0)
    if not all(math.isfinite(t.coef) for t in out):
        raise ValueError(f"non-finite sampler coefficient in {out}: the config makes this sampler diverge")
    return out


@dataclass(frozen=True)
class Update:
    """What ``step(i)`` returns; ``correction`` first replaces the sample (UniPC's corrector)."""

    out: tuple[Term, ...]
    correction: tuple[Term, ...] = ()
    draws_noise: bool = False

    def reads(self, source: Source) -> bool:
        return any(t.source is source for t in self.out + self.correction)


@dataclass(frozen=True)
class Plan:
    """Everything ``set_timesteps`` computes, for the evaluations the run will make."""

    timesteps: np.ndarray
    init_noise_sigma: float
    input_scale: np.ndarray  # scale_model_input multiplies by this
    denoiser: Denoiser
    updates: tuple[Update, ...]
    noise_scale: np.ndarray  # add_noise(x, n, i) = noise_scale[i, 0] * x + noise_scale[i, 1] * n
    order: int  # model evaluations per step
    keep: dict[Source, int] = field(init=False)  # how far back step reads each source
    denoise_at: tuple[bool, ...] = field(init=False)  # whether step(i) needs the denoised estimate

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        if not len(self.updates) == len(self.input_scale) == len(self.noise_scale) == n:
            raise AssertionError("plan tables disagree in length")
        self.timesteps.flags.writeable = False
        if self.denoiser.clip is None and not any(
            t.source is Source.DENOISED and t.lag > 0 for u in self.updates for t in u.out + u.correction
        ):
            object.__setattr__(
                self, "updates", tuple(_fold(u, self.denoiser, i) for i, u in enumerate(self.updates))
            )
        keep: dict[Source, int] = {}
        for upd in self.updates:
            for t in upd.out + upd.correction:
                keep[t.source] = max(keep.get(t.source, 0), t.lag)
        object.__setattr__(self, "keep", {s: lag for s, lag in keep.items() if lag > 0})
        kept = Source.DENOISED in self.keep
        object.__setattr__(self, "denoise_at", tuple(kept or u.reads(Source.DENOISED) for u in self.updates))

    @property
    def noise_steps(self) -> np.ndarray:
        return np.array([u.draws_noise for u in self.updates], dtype=bool)


def _fold(update: Update, denoiser: Denoiser, i: int) -> Update:
    """Substitute x0 = skip * x + out * model_output into this evaluation's terms (fewer array ops)."""
    skip, out = float(denoiser.skip[i]), float(denoiser.out[i])

    def fold(items: tuple[Term, ...]) -> tuple[Term, ...]:
        parts = []
        for t in items:
            if t.source is Source.DENOISED:
                parts += [(Source.SAMPLE, 0, t.coef * skip), (Source.MODEL, 0, t.coef * out)]
            else:
                parts.append((t.source, t.lag, t.coef))
        return terms(*parts)

    return Update(fold(update.out), fold(update.correction), update.draws_noise)


class History:
    """Arrays later evaluations read, keyed by (source, evaluation index)."""

    def __init__(self, keep: dict[Source, int]) -> None:
        self._keep = keep
        self._arrays: dict[tuple[Source, int], Any] = {}

    def get(self, source: Source, i: int) -> Any:
        try:
            return self._arrays[source, i]
        except KeyError:
            raise ValueError(
                f"step needs the {source.value} of step {i}: call step for i = 0, 1, 2, ... in order"
            ) from None

    def record(self, i: int, now: dict[Source, Any]) -> None:
        """Keep this evaluation's arrays (copies: callers may reuse buffers) and forget stale ones."""
        self._arrays = {
            (s, j): a for (s, j), a in self._arrays.items() if j < i and i - j < self._keep.get(s, 0)
        }
        for source, lag in self._keep.items():
            if lag > 0 and source in now:
                self._arrays[source, i] = _own(now[source])


def _own(array: Any) -> Any:
    copy = getattr(array, "copy", None) or getattr(array, "clone", None)
    return copy() if copy is not None else array * 1.0


def combine(items: Iterable[Term], now: dict[Source, Any], history: History, i: int) -> Any:
    """sum(coef * source[i - lag]) with Python-float coefficients, so the array keeps its dtype."""
    out, owned = None, False
    for t in items:
        array = now[t.source] if t.lag == 0 else history.get(t.source, i - t.lag)
        part = array if t.coef == 1.0 else array * t.coef
        if out is None:
            out, owned = part, t.coef != 1.0
        elif owned:
            out += part
        else:
            out, owned = out + part, True
    if out is None:
        raise AssertionError("an update without terms")
    return out
