"""End to end, side by side: sd-engine vs diffusers on the same weights, prompt, sampler and seed.

    python benchmarks/e2e.py MODEL_DIR ENGINE_DIR --size 256 --steps 20 --runs 3 [--json OUT.json]

Each contender runs in its own process (load, one warm-up, then --runs timed runs); the parent
prints wall-time medians, per-stage medians, their ratio and the PSNR between the two images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, oil painting"
NEGATIVE = "blurry, low quality"


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from engine import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(args.engine_dir, backend=args.backend)
    load = time.perf_counter() - start
    settings = {
        "steps": args.steps, "width": args.size, "height": args.size, "guidance_scale": args.cfg,
        "sampler": args.sampler, "seed": args.seed,
    }  # fmt: skip
    samples, stages = [], []
    for run in range(args.runs + 1):
        pipe.embeddings = type(pipe.embeddings)()  # every run pays for the text encoder, as diffusers does
        start = time.perf_counter()
        result = pipe.generate(PROMPT, NEGATIVE, **settings)
        if run:
            samples.append(time.perf_counter() - start)
            stages.append(result.timings)
    stage_medians = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    return {
        "load_s": load,
        "samples_s": samples,
        "stages_ms": stage_medians,
        "image": np.asarray(result.images[0]),
    }


def run_diffusers(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    from engine.sampling.registry import lookup

    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.model_dir, safety_checker=None)
    entry = lookup(args.sampler)
    pipe.scheduler = getattr(diffusers, entry.diffusers_class).from_config(
        pipe.scheduler.config, **entry.forced
    )
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - start
    clock = StageClock()
    clock.wrap(pipe.text_encoder, "forward", "text_encoder")
    clock.wrap(pipe.unet, "forward", "unet_total")
    clock.wrap(pipe.vae, "decode", "vae_decode")
    samples, stages = [], []
    for run in range(args.runs + 1):
        clock.reset()
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, width=args.size,
                       height=args.size, guidance_scale=args.cfg, output_type="np",
                       generator=[torch.Generator("cpu").manual_seed(args.seed)])  # fmt: skip
        total = time.perf_counter() - start
        if run:
            samples.append(total)
            stages.append({**clock.totals, "total": total * 1000})
    stage_medians = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    image = (out.images[0] * 255).round().astype(np.uint8)
    return {"load_s": load, "samples_s": samples, "stages_ms": stage_medians, "image": image}


class StageClock:
    """Per-instance timing wrappers (the instances' own attributes; library code is untouched)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def reset(self) -> None:
        self.totals = {k: 0.0 for k in self.totals}

    def wrap(self, obj: Any, method: str, name: str) -> None:
        inner = getattr(obj, method)
        self.totals[name] = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[name] += (time.perf_counter() - start) * 1000

        setattr(obj, method, timed)


def child(args: argparse.Namespace) -> None:
    result = run_engine(args) if args.child == "engine" else run_diffusers(args)
    np.save(args.out + ".npy", result.pop("image"))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(result))


def parent(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name in ("engine", "diffusers"):
        out = f"/tmp/sd-engine-e2e-{os.getpid()}-{name}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--out", out]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        results[name] = json.loads(Path(out).read_text())
        results[name]["image"] = np.load(out + ".npy")
    a, b = (results[n].pop("image").astype(np.float64) for n in ("engine", "diffusers"))
    mse = float(np.mean((a - b) ** 2))
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out", "json")},
        "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse),
        **results,
    }
    report["speedup"] = statistics.median(results["diffusers"]["samples_s"]) / statistics.median(
        results["engine"]["samples_s"]
    )
    return report


def print_report(report: dict[str, Any]) -> None:
    eng, ref = report["engine"], report["diffusers"]
    print(f"{'':22s}{'sd-engine':>12s}{'diffusers':>12s}{'ratio':>8s}")
    rows = [("load (s)", eng["load_s"], ref["load_s"])]
    rows.append(
        ("end to end (s, p50)", statistics.median(eng["samples_s"]), statistics.median(ref["samples_s"]))
    )
    for stage in ("text_encoder", "unet_total", "vae_decode"):
        rows.append((f"{stage} (ms)", eng["stages_ms"].get(stage, 0.0), ref["stages_ms"].get(stage, 0.0)))
    rows.append(("peak RSS (MiB)", eng["peak_rss_mib"], ref["peak_rss_mib"]))
    for name, ours, theirs in rows:
        print(f"{name:22s}{ours:12.2f}{theirs:12.2f}{theirs / ours if ours else 0:8.2f}")
    print(f"scheduler+host per step (ms): {eng['stages_ms'].get('scheduler_per_step', 0):.2f}")
    print(f"speedup (diffusers / sd-engine, p50): {report['speedup']:.2f}x   PSNR {report['psnr_db']:.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("engine_dir")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--child", choices=["engine", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = parent(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
