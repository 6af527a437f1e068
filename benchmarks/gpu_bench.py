"""GPU benchmark: torch-CUDA, ONNX Runtime CUDA and TensorRT, with and without CUDA graphs and fused
guidance (the unet_cfg graph), against diffusers fp16 eager.

    python benchmarks/gpu_bench.py MODEL_DIR ENGINE_DIR --out RESULTS_DIR [--size 512 --steps 50 --runs 3]

Every contender runs in its own process (load, one warm-up generation, then --runs timed ones) at the
same prompt, sampler, seed and size, batch 1, classifier-free guidance on. Reported per contender:
it/s (UNet steps per second of the sampling loop), s/image (text encoder to PIL image), the UNet's
device time per step (CUDA events) and the host overhead per step: loop time per step minus the UNet's
device time, i.e. everything the GPU spends not running the UNet (scheduler, guidance, copies,
synchronisation, launch gaps). Each image is compared (PSNR) with an fp32 CPU reference made by
diffusers from the same weights and seed. TensorRT contenders run when tensorrt and built plans exist.
Writes results.json, results.md and the images into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, oil painting"
NEGATIVE = "blurry, low quality"
ENGINE_CONTENDERS = {
    # name: (backend, backend options, fused guidance: the unet_cfg graph)
    "torch-cuda eager": ("torch-cuda", {"cuda_graph": False}, False),
    "torch-cuda graph": ("torch-cuda", {"cuda_graph": True}, False),
    "torch-cuda graph + fused CFG": ("torch-cuda", {"cuda_graph": True}, True),
    "onnxruntime-cuda io-binding": ("onnxruntime", {"provider": "CUDAExecutionProvider"}, False),
    "onnxruntime-cuda graph + fused CFG": (
        "onnxruntime",
        {"provider": "CUDAExecutionProvider", "cuda_graph": True},
        True,
    ),
    "tensorrt": ("tensorrt", {"cuda_graph": False}, False),
    "tensorrt graph": ("tensorrt", {"cuda_graph": True}, False),
    "tensorrt graph + fused CFG": ("tensorrt", {"cuda_graph": True}, True),
}
CONTENDERS = ["diffusers fp16 eager", *ENGINE_CONTENDERS]
TIMED_BACKENDS = ("torch-cuda", "tensorrt")  # their graphs record CUDA-event device times


def engine_pipeline(args: argparse.Namespace, backend: str, options: dict[str, Any], fused: bool) -> Any:
    from engine.pipeline import Pipeline

    if backend in TIMED_BACKENDS:
        options = {**options, "timing": True}
    return Pipeline.load(args.engine_dir, backend, fused_cfg=fused, **options)


def engine_generate(pipe: Any, args: argparse.Namespace) -> tuple[Any, dict[str, float]]:
    """One generation, with a timestamp at the end of every step."""
    step_ends: list[float] = []
    pipe.embeddings = type(pipe.embeddings)()  # every run pays for the text encoder, as diffusers does
    start = time.perf_counter()
    result = pipe.generate(
        PROMPT, NEGATIVE, steps=args.steps, width=args.size, height=args.size, guidance_scale=args.cfg,
        sampler=args.sampler, seed=args.seed, callback=lambda info: step_ends.append(time.perf_counter()),
    )  # fmt: skip
    total = time.perf_counter() - start
    return result.images[0], {
        "total_s": total,
        "step_ms": float(np.mean(np.diff(step_ends))) * 1000,
        "unet_call_ms": result.timings["unet_per_step"],
        "host_ms": result.timings["scheduler_per_step"],
    }


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from engine.specs import Network

    backend, options, fused = ENGINE_CONTENDERS[args.child]
    start = time.perf_counter()
    pipe = engine_pipeline(args, backend, options, fused)
    load = time.perf_counter() - start
    unet = pipe.graph(Network.UNET_CFG if fused else Network.UNET)
    clock = getattr(unet, "device_ms", None)
    samples = []
    for run in range(args.runs + 1):  # run 0 warms up (and captures the CUDA graph)
        done = len(clock) if clock is not None else 0
        image, timing = engine_generate(pipe, args)
        if clock is not None:  # the loop's steps 2..n, as measured by CUDA events
            timing["unet_device_ms"] = float(np.mean(unet.device_ms[done + 1 :]))
        if run:
            samples.append(timing)
    return {"load_s": load, "samples": samples, "image": np.asarray(image), "providers": unet.providers}


def run_diffusers(args: argparse.Namespace, device: str, dtype: str) -> dict[str, Any]:
    import diffusers
    import torch

    from engine.sampling.registry import lookup

    start = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch_dtype,
                                                             safety_checker=None).to(device)  # fmt: skip
    entry = lookup(args.sampler)
    pipe.scheduler = getattr(diffusers, entry.diffusers_class).from_config(
        pipe.scheduler.config, **entry.forced
    )
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - start
    clock = UnetClock(pipe.unet) if device == "cuda" else None
    runs = args.runs + 1 if device == "cuda" else 1
    samples = []
    step_times: list[float] = []

    def on_step(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
        if device == "cuda" and i in (0, args.steps - 1):
            torch.cuda.synchronize()  # only at the ends: the loop in between runs as diffusers runs it
        step_times.append(time.perf_counter())
        return kwargs

    for run in range(runs):
        step_times.clear()
        if clock is not None:
            clock.device_ms.clear()

        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, width=args.size,
                       height=args.size, guidance_scale=args.cfg, output_type="np",
                       callback_on_step_end=on_step,
                       generator=[torch.Generator("cpu").manual_seed(args.seed)])  # fmt: skip
        total = time.perf_counter() - start
        timing = {
            "total_s": total,
            "step_ms": (step_times[-1] - step_times[0]) / (len(step_times) - 1) * 1000,
        }
        if clock is not None:
            clock.flush()
            timing["unet_device_ms"] = float(np.mean(clock.device_ms[1:]))
        if run or runs == 1:
            samples.append(timing)
    image = (out.images[0] * 255).round().astype(np.uint8)
    return {"load_s": load, "samples": samples, "image": image}


class UnetClock:
    """CUDA events around each UNet forward of a diffusers pipeline (this instance's attribute only)."""

    def __init__(self, unet: Any) -> None:
        import torch

        self.torch = torch
        self.device_ms: list[float] = []
        self.pending: list[tuple[Any, Any]] = []
        inner = unet.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            try:
                return inner(*args, **kwargs)
            finally:
                end.record()
                self.pending.append((start, end))

        unet.forward = timed

    def flush(self) -> None:
        self.torch.cuda.synchronize()
        self.device_ms.extend(start.elapsed_time(end) for start, end in self.pending)
        self.pending.clear()


def available(name: str, args: argparse.Namespace) -> str | None:
    """Why a contender cannot run here, or None."""
    import importlib.util

    backend = ENGINE_CONTENDERS.get(name, ("",))[0]
    if backend == "onnxruntime":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return 'onnxruntime has no CUDA provider (pip install "sd-engine[gpu]")'
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return 'tensorrt is not installed (pip install "sd-engine[tensorrt]")'
        if not (Path(args.engine_dir) / "tensorrt" / "plans.json").is_file():
            return "no TensorRT plans: run `python -m engine.build_trt ENGINE_DIR` first"
    return None


def child(args: argparse.Namespace) -> None:
    if args.child == "reference":
        result = run_diffusers(args, "cpu", "float32")
    elif args.child == "diffusers fp16 eager":
        result = run_diffusers(args, "cuda", "float16")
    else:
        result = run_engine(args)
    np.save(args.child_out + ".npy", result.pop("image"))
    Path(args.child_out).write_text(json.dumps(result))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def spawn(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    slug = name.replace(" ", "_").replace("+", "plus")
    target = out / f"{slug}.json"
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--child-out", str(target)]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        return {"error": f"exit code {done.returncode} (see the log)"}
    result = json.loads(target.read_text())
    result["image"] = np.load(str(target) + ".npy")
    from PIL import Image

    Image.fromarray(result["image"]).save(out / f"{slug}.png")
    return result


def summarize(result: dict[str, Any], reference: np.ndarray | None) -> dict[str, Any]:
    samples = result["samples"]
    step_ms = statistics.median(s["step_ms"] for s in samples)
    # Device time from CUDA events where the contender records them, else the UNet call's wall time.
    device = statistics.median(s.get("unet_device_ms", s.get("unet_call_ms", float("nan"))) for s in samples)
    return {
        "it_per_s": 1000 / step_ms,
        "s_per_image": statistics.median(s["total_s"] for s in samples),
        "step_ms": step_ms,
        "unet_device_ms_per_step": device,
        "host_overhead_ms_per_step": step_ms - device,
        "psnr_vs_fp32_cpu_db": psnr(result["image"], reference) if reference is not None else None,
        "load_s": result["load_s"],
        "host_loop_ms_per_step": statistics.median(s["host_ms"] for s in samples)
        if "host_ms" in samples[0]
        else None,
        "providers": result.get("providers"),
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# GPU benchmark: {report['machine']['gpu']}",
        "",
        f"{s['size']}x{s['size']}, {s['steps']} steps, CFG {s['cfg']}, batch 1, {s['sampler']}, "
        f"seed {s['seed']}, median of {s['runs']} runs after one warm-up. "
        "Host overhead = loop time per step - UNet device time.",
        "",
        "| contender | it/s | s/image | UNet device ms/step | host overhead ms/step | PSNR vs fp32 CPU dB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["results"].items():
        if "skipped" in row or "error" in row:
            lines.append(f"| {name} | {row.get('skipped') or row.get('error')} | | | | |")
            continue
        db = row["psnr_vs_fp32_cpu_db"]
        lines.append(
            f"| {name} | {row['it_per_s']:.2f} | {row['s_per_image']:.2f} "
            f"| {row['unet_device_ms_per_step']:.2f} | {row['host_overhead_ms_per_step']:.2f} "
            f"| {'n/a' if db is None else f'{db:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    except ImportError:
        return "torch missing"


def parent(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = None
    if not args.no_reference:
        ref = spawn("reference", args, out)
        reference = ref.get("image")
    results: dict[str, Any] = {}
    for name in args.contenders:
        reason = available(name, args)
        if reason is not None:
            results[name] = {"skipped": reason}
            continue
        raw = spawn(name, args, out)
        results[name] = raw if "error" in raw else summarize(raw, reference)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_out")}
    machine = {"gpu": gpu_name(), "platform": platform.platform(), "cpus": os.cpu_count()}
    return {"machine": machine, "settings": settings, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("engine_dir")
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--no-reference", action="store_true", help="skip the fp32 CPU reference image")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = parent(args)
    (Path(args.out) / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (Path(args.out) / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
