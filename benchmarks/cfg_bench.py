"""Fused guidance (the unet_cfg graph) against guidance on the host, side by side in one process.

    python benchmarks/cfg_bench.py ENGINE_DIR [--size 256 --steps 20 --runs 3 --backend onnxruntime]

Both pipelines load from the same engine folder; generations alternate (host, fused, host, fused, ...)
after one warm-up each, at the same prompt, seed and sampler, so machine noise hits both alike.
Reported medians per step: host work (scale_model_input, building the UNet inputs, the guidance
combine, the scheduler step and its noise), the UNet call, and the bytes that cross into and out of
the UNet call; plus the whole generation and the largest pixel difference between the two images.
Writes JSON with every sample to --out when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, oil painting"
NEGATIVE = "blurry, low quality"


def crossing_bytes(batch: int, latent: tuple[int, int, int], context: tuple[int, int], fused: bool) -> int:
    """Bytes into and out of one guided UNet call (float32), with or without fused guidance."""
    latent_bytes = 4 * int(np.prod(latent))
    embeddings = 4 * 2 * batch * context[0] * context[1]
    if fused:  # B latents + B timesteps + 2B embeddings + the scale in, B guided noises out
        return batch * latent_bytes + 4 * batch + embeddings + 4 + batch * latent_bytes
    return 2 * batch * latent_bytes + 4 * 2 * batch + embeddings + 2 * batch * latent_bytes


def generate(pipe: Any, args: argparse.Namespace) -> tuple[np.ndarray, dict[str, float]]:
    pipe.embeddings = type(pipe.embeddings)()  # each run pays for its text encoder, as a fresh prompt does
    start = time.perf_counter()
    result = pipe.generate(
        PROMPT, NEGATIVE, steps=args.steps, width=args.size, height=args.size, seed=args.seed,
        sampler=args.sampler, guidance_scale=args.cfg,
    )  # fmt: skip
    timing = {
        "total_ms": (time.perf_counter() - start) * 1000,
        "host_ms_per_step": result.timings["scheduler_per_step"],
        "unet_ms_per_step": result.timings["unet_per_step"],
    }
    return np.asarray(result.images[0]), timing


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from engine.pipeline import Pipeline

    pipes = {
        name: Pipeline.load(args.engine_dir, args.backend, fused_cfg=name == "fused")
        for name in ("host", "fused")
    }
    images: dict[str, np.ndarray] = {}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    for run in range(args.runs + 1):  # run 0 warms both up
        for name, pipe in pipes.items():
            images[name], timing = generate(pipe, args)
            if run:
                samples[name].append(timing)
            print(f"run {run} {name}: {timing}", file=sys.stderr, flush=True)
    dims = pipes["host"].manifest.dims
    side = args.size // dims.vae_scale_factor
    latent, context = (dims.latent_channels, side, side), (dims.text_max_length, dims.text_hidden_size)
    summary = {
        name: {
            **{key: statistics.median(s[key] for s in samples[name]) for key in samples[name][0]},
            "bytes_per_step": crossing_bytes(1, latent, context, name == "fused"),
        }
        for name in pipes
    }
    diff = int(np.abs(images["host"].astype(np.int16) - images["fused"].astype(np.int16)).max())
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
              "max_pixel_difference": diff, "samples": samples}  # fmt: skip
    print(json.dumps({"summary": summary, "max_pixel_difference": diff}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
