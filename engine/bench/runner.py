"""Runs each contender in its own process, one after the other, and gathers the results.

Before a contender starts, the files it will load are read once so that every contender starts
with the operating system's file cache warm: cold start then measures the process (imports,
loading, the first run), not the disk, and does not depend on the order of the contenders.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench.child import FIRST_IMAGE, RESULT_FILE, child_env
from engine.bench.config import (
    DIFFUSERS,
    REFERENCE_CPU_FP32,
    REFERENCE_CUDA_FP32,
    BenchConfig,
    ChildSpec,
    Contender,
    Device,
)
from engine.bench.machine import load_average, machine_info, software_info
from engine.bench.stats import finalize, image_agreement
from engine.errors import EngineError

SCHEMA = "sd-engine-bench/1"
READ_CHUNK = 16 * 2**20
STATISTICS_NOTE = (
    "latency p50/p90: linear interpolation between closest ranks (numpy's default) over the timed runs; "
    "stage figures: medians over the timed runs; ratios: from those medians; "
    "host overhead per step: (latency - text encoder - UNet - VAE decode) / UNet evaluations; "
    "UNet device time per step: CUDA events around the UNet (first step of a run left out), "
    "where the contender records them; loop minus device per step: (latency - text encoder - "
    "VAE decode) / UNet evaluations - UNet device time; "
    "compile: wall time of the UNet's first torch.compile'd call (compilation plus that run), where the "
    "backend compiled; first-run overhead: first run - warm latency p50 (compilation, CUDA-graph capture, "
    "autotuning, lazy initialisation)"
)
# --psnr-reference -> where its diffusers fp32 run happens
REFERENCE_DEVICES = {REFERENCE_CPU_FP32: Device.CPU, REFERENCE_CUDA_FP32: Device.CUDA}


def files_loaded_by(contender: Contender, config: BenchConfig) -> list[Path]:
    """The files a contender reads when it loads (what to pre-read into the file cache)."""
    if not contender.is_engine or contender.kind in ("torch", "torch-cuda") or config.engine_dir is None:
        return sorted(p for p in config.model_dir.rglob("*") if p.is_file())
    cache = config.engine_dir / ".cache"
    cached = sorted(p for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else []
    graphs = [p for p in config.engine_dir.rglob("*") if p.is_file() and cache not in p.parents]
    return cached + [p for p in graphs if p.suffix not in (".onnx", ".data")] if cached else graphs


def read_files(paths: Iterable[Path]) -> int:
    """Read files to the end, discarding the bytes; returns how many bytes were read."""
    buffer = bytearray(READ_CHUNK)
    total = 0
    for path in paths:
        with path.open("rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total


def run_child(spec: ChildSpec) -> dict[str, Any]:
    """Spawn one contender's process and read back its result (a failure becomes a result too)."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    spec_file = spec.out_dir / "spec.json"
    spec_file.write_text(json.dumps(spec.to_json(), indent=1), encoding="utf-8")
    spawn_time = time.time()
    process = subprocess.run(
        [sys.executable, "-m", "engine.bench.child", str(spec_file), repr(spawn_time)],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,
        check=False,
    )
    result_file = spec.out_dir / RESULT_FILE
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    return {"status": "failed", "error": describe_exit(process.returncode)}


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the process was killed by {name}{hint}"
    return f"the process exited with code {code} before writing its result (see its output above)"


def child_spec(config: BenchConfig, contender: Contender, out_dir: Path) -> ChildSpec:
    return ChildSpec(
        contender=contender,
        model_dir=config.model_dir,
        engine_dir=config.engine_dir,
        workload=config.workload,
        runs=config.runs,
        warmup=config.warmup,
        device=config.device,
        out_dir=out_dir,
    )


def reference_spec(config: BenchConfig, out_dir: Path, device: Device = Device.CPU) -> ChildSpec:
    """diffusers fp32 on ``device``, one untimed generation of the first prompt: the PSNR reference."""
    return ChildSpec(
        contender=Contender(DIFFUSERS),
        model_dir=config.model_dir,
        engine_dir=None,
        workload=config.workload,
        runs=1,
        warmup=0,
        device=device,
        out_dir=out_dir,
    )


def run_reference(config: BenchConfig, tmp: Path, say: Callable[[str], None]) -> np.ndarray | None:
    """The reference image for the PSNR column (diffusers fp32 on the CPU or on the CUDA GPU, one
    extra untimed run), or None when that is the baseline's first image."""
    device = REFERENCE_DEVICES.get(config.psnr_reference)
    if device is None:
        return None
    where = "the CPU" if device is Device.CPU else "the CUDA GPU"
    say(f"[reference] diffusers fp32 on {where}: one run for the PSNR column")
    out_dir = tmp / "reference"
    result = run_child(reference_spec(config, out_dir, device))
    if result["status"] != "ok":
        raise EngineError(f"the fp32 {device.value.upper()} reference run failed: {result['error']}")
    return load_image(out_dir / FIRST_IMAGE)


def run_contenders(
    config: BenchConfig, say: Callable[[str], None]
) -> tuple[dict[str, dict[str, Any]], np.ndarray | None]:
    """Every contender in order (each result carries its first image under ``"image"``), and the
    reference image when the PSNR reference is not the baseline."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sd-engine-bench-") as tmp:
        reference = run_reference(config, Path(tmp), say)
        for number, contender in enumerate(config.contenders, start=1):
            say(
                f"[{number}/{len(config.contenders)}] {contender.label}: {config.warmup} warm-up + "
                f"{config.runs} timed runs"
            )
            if config.prewarm_files:
                read_files(files_loaded_by(contender, config))
            out_dir = Path(tmp) / f"{number:02d}"
            result = {"label": contender.label, **run_child(child_spec(config, contender, out_dir))}
            if result["status"] == "ok":
                result["image"] = load_image(out_dir / FIRST_IMAGE)
            else:
                say(f"  {contender.name} failed: {result['error']}")
            results[contender.name] = result
    for name, reason in config.skipped:
        label = Contender.parse(name).label
        results[name] = {"label": label, "status": "skipped", "error": reason}
        say(f"skipped {name}: {reason}")
    return results, reference


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def add_agreement(
    results: dict[str, dict[str, Any]], baseline: str, reference: np.ndarray | None = None
) -> dict[str, dict[str, Any]]:
    """Each contender's first image against the reference, by default the baseline's (PSNR, max abs
    diff); images dropped."""
    if reference is None:
        reference = results.get(baseline, {}).get("image")
    out = {}
    for name, result in results.items():
        entry = {k: v for k, v in result.items() if k != "image"}
        if reference is not None and "image" in result:
            entry["agreement"] = image_agreement(result["image"], reference)
        out[name] = entry
    return out


def measure(config: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the benchmark and build its report (machine, software, config, samples, summaries)."""
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    load_start = load_average()
    results, reference = run_contenders(config, say)
    report = {
        "schema": SCHEMA,
        "created": created,
        "machine": machine_info(),
        "software": software_info(),
        "config": config.to_json(),
        "load_average": {"start": load_start, "end": load_average()},
        "statistics": STATISTICS_NOTE,
        "contenders": add_agreement(results, config.baseline.name, reference),
    }
    return finalize(report)
