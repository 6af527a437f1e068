"""NumPy schedulers that follow diffusers' trajectories step for step, with no torch on the hot path.

    sched = create("DPM++ 2M Karras", scheduler_config)   # A1111 label or diffusers class name
    sched.set_timesteps(25)                               # or (25, strength=0.6) for img2img
    x = noise * sched.init_noise_sigma                    # img2img: sched.add_noise(latents, noise, 0)
    for i, t in enumerate(sched.timesteps):               # one entry per model evaluation
        eps = unet(sched.scale_model_input(x, i), t)
        x = sched.step(eps, i, x, noise=fresh_noise() if sched.noise_steps[i] else None)

``i`` indexes ``timesteps``; nothing is looked up from timestep values. Samplers that evaluate the
model twice per step (``order == 2``: Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a) simply have two
entries per step in ``timesteps``; the caller's loop is the same. Multistep and two-stage samplers
read arrays of earlier evaluations, which ``step(i)`` records under ``i`` (copied), so steps must
run in order from 0 after ``set_timesteps``.

Noise: stochastic samplers (``stochastic``) take standard-normal ``noise`` of the sample's shape and
dtype at each ``i`` where ``noise_steps[i]``: exactly the steps where diffusers draws from its
generator (one ``randn`` of the latents' shape each), so a pipeline drawing from a torch-compatible
generator in the same order reproduces diffusers' image. Without ``noise`` they draw from the
``rng`` given to :func:`create`. DPM++ SDE gets fresh normals at both of its evaluations and
builds the Brownian-tree correlation itself (see ``sampling.karras.build_dpmpp_sde``).

Step counts: every sampler runs 1..num_train_timesteps steps on the configs SD models ship, also
where diffusers fails (steps_offset pushing the leading ladder to timestep 1000, trailing spacing
making a timestep -1, repeated multistep timesteps at 1000 steps: see ``sampling.schedules``);
``set_timesteps`` refuses the rest before building anything, with a one-line RequestError naming
the counts that run (``sampling.steps``; ``Scheduler.allowed_steps``). ``rescale_betas_zero_snr``
applies to every sampler, also those whose diffusers class ignores it.

Any array type with ``*`` and ``+`` works (and ``clip`` for ``clip_sample`` configs): tables hold
float64 and enter the arithmetic as Python floats, so a float32 sample stays float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import RequestError
from .sampling.config import SchedulerConfig, resolve_config
from .sampling.plan import History, Plan, Source, combine
from .sampling.registry import SAMPLERS, Sampler, lookup, resolve
from .sampling.steps import allowed_steps, check_steps

__all__ = ["Scheduler", "SchedulerConfig", "create", "names", "resolve"]


def names() -> list[str]:
    """Every accepted sampler name: A1111 labels (with Karras / Exponential / AYS variants) and
    diffusers class names. Matching ignores case and runs of whitespace (see :func:`resolve`)."""
    return list(SAMPLERS)


def create(
    name: str,
    config: Mapping[str, Any] | None = None,
    *,
    rng: np.random.Generator | None = None,
    **overrides: Any,
) -> Scheduler:
    """A scheduler like diffusers' ``Class.from_config(config, **overrides)``.

    ``config`` is a diffusers ``scheduler_config.json`` dict (unknown keys ignored); ``overrides``
    may also set engine options: ``eta`` (DDIM, DPM++ 2S a, DPM++ 3M SDE) and the sigma schedule
    flags ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_ays_sigmas``.
    """
    sampler = lookup(name)  # by resolve(name): the request's check and this one cannot disagree
    cfg = resolve_config(sampler.defaults, sampler.extensions, config, sampler.forced, overrides)
    return Scheduler(sampler, cfg, rng)


class Scheduler:
    """One sampler with one config; ``set_timesteps`` builds every table, ``step`` applies them."""

    def __init__(self, sampler: Sampler, config: SchedulerConfig, rng: np.random.Generator | None = None):
        self.sampler = sampler
        self.config = config
        self.rng = rng
        self._plan: Plan | None = None
        self._history = History({})
        self.num_inference_steps: int | None = None

    def __repr__(self) -> str:
        return f"Scheduler({self.name!r}, steps={self.num_inference_steps})"

    @property
    def name(self) -> str:
        return self.sampler.name

    @property
    def stochastic(self) -> bool:
        """Whether ``step`` needs noise (at the indices ``noise_steps`` marks)."""
        return self.sampler.stochastic(self.config)

    @property
    def order(self) -> int:
        """Model evaluations per step (2 for Heun, DPM2, DPM2 a, DPM++ SDE, DPM++ 2S a)."""
        return self.sampler.order

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        """Build the run's tables; with strength < 1, keep the tail diffusers' img2img pipeline runs.

        Raises a one-line RequestError (a ValueError) before building anything for a count outside
        1..num_train_timesteps, a strength outside (0, 1] or one that keeps no step, and a count this
        sampler cannot run on this config, naming the counts it can (see ``sampling.steps``).
        """
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise RequestError(f"{self.name}: num_inference_steps must be an integer >= 1, got {steps!r}")
        if steps > self.config.num_train_timesteps:
            raise RequestError(
                f"{self.name}: num_inference_steps {steps} exceeds num_train_timesteps "
                f"{self.config.num_train_timesteps}"
            )
        if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
            raise RequestError(f"{self.name}: strength must be in (0, 1], got {strength!r}")
        kept = min(int(steps * strength), steps)
        if kept < 1:
            raise RequestError(
                f"{self.name}: strength {strength} leaves no steps of {steps}: raise strength or steps"
            )
        check_steps(self.sampler, self.config, int(steps))
        self._plan = self.sampler.build(self.config, int(steps), (steps - kept) * self.order)
        self._history = History(self._plan.keep)
        self.num_inference_steps = int(steps)

    def allowed_steps(self) -> tuple[int, ...]:
        """Every step count in 1..num_train_timesteps that ``set_timesteps`` accepts here."""
        return allowed_steps(self.sampler, self.config)

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            raise RuntimeError(f"{self.name}: call set_timesteps before sampling")
        return self._plan

    @property
    def timesteps(self) -> np.ndarray:
        """One entry per model evaluation, diffusers' values, order and dtype."""
        return self.plan.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return self.plan.init_noise_sigma

    @property
    def noise_steps(self) -> np.ndarray:
        """Boolean per evaluation: step(i) takes fresh noise there."""
        return self.plan.noise_steps

    def _index(self, i: int) -> int:
        n = len(self.plan.timesteps)
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < n:
            raise IndexError(f"step index {i!r} out of range for {n} evaluations")
        return int(i)

    def scale_model_input(self, sample: Any, i: int) -> Any:
        """The UNet's input at evaluation i (Karras samplers divide by sqrt(sigma^2 + 1))."""
        scale = float(self.plan.input_scale[self._index(i)])
        return sample if scale == 1.0 else sample * scale

    def add_noise(self, original: Any, noise: Any, i: int) -> Any:
        """``original`` noised to the level of evaluation i (img2img start: i = 0)."""
        a, b = (float(v) for v in self.plan.noise_scale[self._index(i)])
        return original * a + noise * b if a != 1.0 else original + noise * b

    def step(self, model_output: Any, i: int, sample: Any, noise: Any = None) -> Any:
        """The sample for evaluation i + 1 (the final sample after the last evaluation)."""
        i = self._index(i)
        plan = self.plan
        update = plan.updates[i]
        now = {Source.SAMPLE: sample, Source.MODEL: model_output}
        if plan.denoise_at[i]:
            now[Source.DENOISED] = plan.denoiser(model_output, sample, i)
        if update.draws_noise:
            now[Source.NOISE] = self._noise(noise, sample, i)
        if update.correction:
            now[Source.SAMPLE] = combine(update.correction, now, self._history, i)
        out = combine(update.out, now, self._history, i)
        self._history.record(i, now)
        return out

    def _noise(self, noise: Any, sample: Any, i: int) -> Any:
        if noise is None:
            if self.rng is None:
                raise ValueError(
                    f"sampler {self.name!r} needs noise at step {i}: pass noise= or create(rng=...)"
                )
            return self.rng.standard_normal(sample.shape).astype(sample.dtype, copy=False)
        if tuple(noise.shape) != tuple(sample.shape):
            raise ValueError(
                f"noise shape {tuple(noise.shape)} differs from sample shape {tuple(sample.shape)}"
            )
        return noise
