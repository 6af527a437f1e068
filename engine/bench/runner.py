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
from dataclasses import dataclass
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
# A partial report's entry for a contender that has not run (or was cut off) when it was written.
NOT_RUN = "not run"
NOT_RUN_REASON = "the benchmark stopped before it finished"


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


@dataclass(frozen=True)
class Reference:
    """The PSNR reference's image (HxWx3 uint8), or why there is none.

    Both None: the reference is the baseline's first image (``--psnr-reference baseline``).
    """

    image: np.ndarray | None = None
    error: str | None = None


def run_reference(config: BenchConfig, tmp: Path, say: Callable[[str], None]) -> Reference:
    """The reference for the PSNR column: diffusers fp32 on the CPU or on the CUDA GPU (one extra
    untimed run), or nothing when that is the baseline's first image.

    A failed reference run does not stop the benchmark: it is said in one line and returned as the
    error, and the PSNR column stays empty (never compared with the baseline instead).
    """
    device = REFERENCE_DEVICES.get(config.psnr_reference)
    if device is None:
        return Reference()
    where = "the CPU" if device is Device.CPU else "the CUDA GPU"
    say(f"[reference] diffusers fp32 on {where}: one run for the PSNR column")
    out_dir = tmp / "reference"
    result = run_child(reference_spec(config, out_dir, device))
    if result["status"] != "ok":
        error = f"the fp32 {device.value.upper()} reference run failed: {one_line(result['error'])}"
        say(f"[reference] {error}; the contenders run, the PSNR column stays empty")
        return Reference(error=error)
    return Reference(load_image(out_dir / FIRST_IMAGE))


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def run_contender(config: BenchConfig, number: int, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Contender ``number`` (1-based) in its own process: its result, with its first image under
    ``"image"`` when it ran."""
    contender = config.contenders[number - 1]
    say(
        f"[{number}/{len(config.contenders)}] {contender.label}: {config.warmup} warm-up + "
        f"{config.runs} timed runs"
    )
    if config.prewarm_files:
        read_files(files_loaded_by(contender, config))
    out_dir = tmp / f"{number:02d}"
    result = {"label": contender.label, **run_child(child_spec(config, contender, out_dir))}
    if result["status"] == "ok":
        result["image"] = load_image(out_dir / FIRST_IMAGE)
    else:
        say(f"  {contender.name} failed: {result['error']}")
    return result


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def add_agreement(
    results: dict[str, dict[str, Any]], reference: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """Each contender's first image against ``reference`` (PSNR, max abs diff), none when there is no
    reference; images dropped."""
    out = {}
    for name, result in results.items():
        entry = {k: v for k, v in result.items() if k != "image"}
        if reference is not None and "image" in result:
            entry["agreement"] = image_agreement(result["image"], reference)
        out[name] = entry
    return out


def reference_image(
    config: BenchConfig, results: dict[str, dict[str, Any]], reference: Reference
) -> np.ndarray | None:
    """What the PSNR column compares with: the fp32 reference when one was asked for (None when its
    run failed), else the baseline's first image (None until the baseline has run, or when it failed)."""
    if config.psnr_reference in REFERENCE_DEVICES:
        return reference.image
    return results.get(config.baseline.name, {}).get("image")


def build_report(
    head: dict[str, Any],
    config: BenchConfig,
    results: dict[str, dict[str, Any]],
    reference: Reference,
    load_start: list[float] | None,
) -> dict[str, Any]:
    """The report from the results so far, finalized (summaries, ratios, agreement).

    Contenders that have not run yet (``results`` lacks them) make it partial: ``"partial": true``,
    their names under ``"not_run"``, and each an entry of status ``"not run"``. Skipped contenders
    come last, as in a complete report. A failed reference's reason is ``config.psnr_reference_error``.
    """
    not_run = [c for c in config.contenders if c.name not in results]
    contenders = add_agreement(results, reference_image(config, results, reference))
    for contender in not_run:
        contenders[contender.name] = {"label": contender.label, "status": NOT_RUN, "error": NOT_RUN_REASON}
    for name, reason in config.skipped:
        contenders[name] = {"label": Contender.parse(name).label, "status": "skipped", "error": reason}
    failed = {} if reference.error is None else {"psnr_reference_error": reference.error}
    report = {
        **head,
        "config": {**head["config"], **failed},
        "load_average": {"start": load_start, "end": load_average()},
        "statistics": STATISTICS_NOTE,
        "contenders": contenders,
    }
    if not_run:
        report = {**report, "partial": True, "not_run": [c.name for c in not_run]}
    return finalize(report)


def measure(
    config: BenchConfig,
    say: Callable[[str], None],
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and build its report (machine, software, config, samples, summaries).

    ``checkpoint``, when given, receives the report so far (:func:`build_report`, partial) after the
    reference run and after every contender, before the next one starts: what a run that is killed
    can keep. The report returned at the end is complete (no ``partial`` field).
    """
    head = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine_info(),
        "software": software_info(),
        "config": config.to_json(),
    }
    load_start = load_average()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sd-engine-bench-") as tmp:
        reference = run_reference(config, Path(tmp), say)
        for number, contender in enumerate(config.contenders, start=1):
            if checkpoint is not None:
                checkpoint(build_report(head, config, results, reference, load_start))
            results[contender.name] = run_contender(config, number, Path(tmp), say)
    report = build_report(head, config, results, reference, load_start)
    if checkpoint is not None:
        checkpoint({**report, "partial": True, "not_run": []})
    for name, reason in config.skipped:
        say(f"skipped {name}: {reason}")
    return report
