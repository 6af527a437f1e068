"""Statistics over a contender's samples, and each contender's ratios to the baseline.

Percentiles interpolate linearly between the two closest ranks (Hyndman & Fan type 7, numpy's
default ``method="linear"``): with 3 samples, p50 is the middle one and p90 lies 80% of the way
from the middle to the largest. Everything here is recomputed from the samples a report stores, so
a saved report can be re-summarized (``sd-engine bench --report``) and checked.

"Per step" means per UNet evaluation (the same as per sampler step for first-order samplers).
Host overhead per step is everything outside the networks, spread over the steps:
(end-to-end latency - text encoder - UNet - VAE decode) / UNet evaluations. Where a contender records
the UNet's device time (CUDA events), the gap per step is the sampling loop's time per step minus
that device time: everything the GPU spends not running the UNet (scheduler, guidance, copies,
synchronisation, launch gaps).

Start-up beyond loading: ``compile_s`` is the wall time of the UNet's first ``torch.compile``'d call
(compilation plus that run; from the contender's info, where the backend compiled), and
``first_run_overhead_s`` is the first run's latency minus the warm p50 latency: what the first
generation pays once (compilation, CUDA-graph capture, autotuning, lazy initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.parity import max_abs, psnr

TIMED = "timed"
# Stage medians in every summary, in table order.
STAGES = ("text_encoder", "unet_per_step", "scheduler_per_step", "host_per_step", "vae_decode", "unet_total")
# Time-like summary fields whose ratio is baseline / contender (a speedup: above 1 is faster).
SPEEDUP_FIELDS = ("cold_start_s", "load_s", "text_encoder", "unet_per_step", "vae_decode")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(float(v) for v in values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "min": float(min(values)),
        "max": float(max(values)),
        "mean": float(sum(values) / len(values)),
    }


def timed_samples(samples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [s for s in samples if s["phase"] == TIMED]


def derived(sample: Mapping[str, Any]) -> dict[str, float]:
    """Per-sample quantities built from measured ones: host overhead per step, denoising time."""
    stages = sample["stages_ms"]
    latency = float(sample["latency_ms"])
    networks = stages["text_encoder"] + stages["unet_total"] + stages["vae_decode"]
    calls = max(int(stages["unet_calls"]), 1)
    out = {
        "host_per_step": (latency - networks) / calls,
        "denoise_ms": latency - stages["text_encoder"] - stages["vae_decode"],
    }
    if "unet_device_per_step" in stages:
        out["gap_per_step"] = out["denoise_ms"] / calls - stages["unet_device_per_step"]
    return out


def device_summary(rows: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Medians of the UNet's device time per step and of the loop's time beyond it, where recorded."""
    timed = [r for r in rows if "unet_device_per_step" in r]
    if not timed:
        return {"unet_device_per_step_ms": None, "gap_per_step_ms": None}
    return {
        "unet_device_per_step_ms": percentile([r["unet_device_per_step"] for r in timed], 50),
        "gap_per_step_ms": percentile([r["gap_per_step"] for r in timed], 50),
    }


def summarize(contender: Mapping[str, Any], steps: int, batch_size: int) -> dict[str, Any]:
    """p50/p90/min/max latency, stage medians, it/s, images/s and start-up times of one contender."""
    samples = timed_samples(contender["samples"])
    if not samples:
        raise ValueError("a contender has no timed samples")
    rows = [{**s["stages_ms"], **derived(s)} for s in samples]
    latency = describe([float(s["latency_ms"]) for s in samples])
    stages = {name: percentile([r[name] for r in rows], 50) for name in STAGES}
    timeline = contender["timeline"]
    compile_s = (contender.get("info") or {}).get("compile_s")
    return {
        "latency_ms": latency,
        "stages_ms": stages,
        "it_per_s": steps / (percentile([r["denoise_ms"] for r in rows], 50) / 1000),
        "images_per_s": batch_size / (latency["p50"] / 1000),
        "s_per_image": latency["p50"] / 1000 / batch_size,
        **device_summary(rows),
        "cold_start_s": timeline["cold_start_s"],
        "load_s": timeline["load_s"],
        "import_s": timeline["import_s"],
        "startup_s": timeline["startup_s"],
        "first_run_s": timeline["first_run_s"],
        "first_run_overhead_s": timeline["first_run_s"] - latency["p50"] / 1000,
        "compile_s": None if compile_s is None else float(compile_s),
        "peak_rss_mib": contender["peak_rss_mib"],
        "peak_gpu_mib": contender.get("peak_gpu_mib"),
    }


def _field(summary: Mapping[str, Any], name: str) -> float:
    return float(summary["stages_ms"][name] if name in summary["stages_ms"] else summary[name])


def ratios(summary: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Speedups over the baseline (times: baseline / contender; rates: contender / baseline)."""
    speedup = {"latency_p50": baseline["latency_ms"]["p50"] / summary["latency_ms"]["p50"]}
    for name in SPEEDUP_FIELDS:
        ours = _field(summary, name)
        speedup[name] = _field(baseline, name) / ours if ours > 0 else None
    for name in ("it_per_s", "images_per_s"):
        speedup[name] = summary[name] / baseline[name]
    memory = summary["peak_rss_mib"] / baseline["peak_rss_mib"] if baseline["peak_rss_mib"] else None
    return {"speedup": speedup, "memory_ratio": memory}


def image_agreement(image: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """PSNR (dB, None when identical) and largest absolute difference of two uint8 images."""
    if image.shape != reference.shape:
        raise ValueError(f"images differ in shape: {image.shape} vs {reference.shape}")
    db = psnr(reference, image, peak=255.0)
    return {"psnr_db": None if math.isinf(db) else db, "max_abs_diff": max_abs(reference, image)}


def finalize(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` with every contender's summary and ratios recomputed from its samples."""
    workload = report["config"]["workload"]
    steps, batch = int(workload["steps"]), int(workload["batch_size"])
    summaries = {
        name: summarize(entry, steps, batch) if entry["status"] == "ok" else None
        for name, entry in report["contenders"].items()
    }
    base = summaries.get(report["config"]["baseline"])
    contenders = {
        name: {
            **entry,
            "summary": summaries[name],
            "ratios": ratios(summaries[name], base) if summaries[name] and base else None,
        }
        for name, entry in report["contenders"].items()
    }
    return {**report, "contenders": contenders}
