"""Host cost of one sampler evaluation (scale_model_input + step), ours (NumPy) vs diffusers (torch).

Not a test. Each sampler runs a 25-step trajectory on float32 latents with a fixed fake model
output (the model's cost is not measured); the figure is the median over repeats of the mean time
per evaluation. Our samplers get their noise from the caller (pre-drawn, as the pipeline does);
diffusers draws its own with torch.randn where it needs noise, so its figures include that draw.

    python benchmarks/scheduler_bench.py [--steps 25] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from engine import schedulers
from engine.models.presets import preset_spec

SD15 = preset_spec("sd15").scheduler.config()  # SD 1.5's scheduler_config.json
# label -> (diffusers class, kwargs); None where diffusers has no counterpart we can run here
SAMPLERS = {
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": None,  # diffusers' DPMSolverSDEScheduler needs torchsde (not installed)
    "DPM++ SDE Karras": None,
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "DPM++ 2S a": None,
    "DPM++ 3M SDE": None,
}
SHAPES = ((1, 4, 64, 64), (2, 4, 128, 128))


def time_ours(label: str, shape: tuple[int, ...], steps: int, repeats: int) -> float:
    sched = schedulers.create(label, SD15)
    sched.set_timesteps(steps)
    rng = np.random.default_rng(0)
    model_out = rng.standard_normal(shape).astype(np.float32)
    noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    x0 = (rng.standard_normal(shape) * sched.init_noise_sigma).astype(np.float32)
    runs = []
    for _ in range(repeats):
        x = x0
        start = time.perf_counter()
        for i in range(len(sched.timesteps)):
            sched.scale_model_input(x, i)
            x = sched.step(model_out, i, x, noise=noise[i % 4] if sched.noise_steps[i] else None)
        runs.append((time.perf_counter() - start) / len(sched.timesteps))
    return statistics.median(runs)


def time_diffusers(label: str, shape: tuple[int, ...], steps: int, repeats: int) -> float | None:
    spec = SAMPLERS[label]
    if spec is None:
        return None
    import diffusers
    import torch

    cls_name, kwargs = spec
    generator = torch.Generator().manual_seed(0)
    model_out = torch.randn(shape, generator=generator)
    x0 = torch.randn(shape, generator=generator)
    runs = []
    for _ in range(repeats):
        sched = getattr(diffusers, cls_name).from_config(SD15, **kwargs)
        sched.set_timesteps(steps)
        extra = {"generator": generator} if "generator" in _step_params(sched) else {}
        x = x0 * sched.init_noise_sigma
        start = time.perf_counter()
        for t in sched.timesteps:
            sched.scale_model_input(x, t)
            x = sched.step(model_out, t, x, **extra).prev_sample
        runs.append((time.perf_counter() - start) / len(sched.timesteps))
    return statistics.median(runs)


def _step_params(sched) -> set[str]:
    import inspect

    return set(inspect.signature(sched.step).parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    header = ["sampler"] + [
        f"{name} {'x'.join(map(str, s))} (us/eval)" for s in SHAPES for name in ("ours", "diffusers")
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label in SAMPLERS:
        cells = [label]
        for shape in SHAPES:
            ours = time_ours(label, shape, args.steps, args.repeats)
            theirs = time_diffusers(label, shape, args.steps, args.repeats) if have_diffusers else None
            cells += [f"{ours * 1e6:.0f}", "n/a" if theirs is None else f"{theirs * 1e6:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
