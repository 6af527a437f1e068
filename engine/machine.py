"""Facts of this machine that caches and benchmarks key on: physical cores, CPU model and flags, GPU;
and handing freed heap memory back to the OS."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may use: distinct (package, core) pairs of /proc/cpuinfo."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    package = "0"
    for line in _read_text(Path("/proc/cpuinfo")).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            cores.add((package, value.strip()))
    return max(1, min(len(cores), allowed)) if cores else max(1, allowed)


def machine_fingerprint(gpu: bool = False) -> dict[str, str]:
    """What an optimized graph depends on besides its source: CPU model and ISA flags (NCHWc
    layouts, kernel choices), architecture, and with ``gpu`` the GPU models."""
    fields = {"machine": platform.machine(), "cpu": "", "flags": ""}
    for line in _read_text(Path("/proc/cpuinfo")).splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not fields["cpu"]:
            fields["cpu"] = value.strip()
        elif key in ("flags", "Features") and not fields["flags"]:
            fields["flags"] = " ".join(sorted(value.split()))
    fields["cpu"] = fields["cpu"] or platform.processor()
    if gpu:
        fields["gpu"] = ";".join(_gpu_models())
    return fields


def _gpu_models() -> list[str]:
    """GPU model names from the NVIDIA driver's procfs, without CUDA libraries."""
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in _read_text(info).splitlines():
            if line.startswith("Model:"):
                models.append(line.partition(":")[2].strip())
    return models


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def release_freed_memory() -> None:
    """Hand memory freed by dropped sessions, merged weights or a finished torch network back to the OS
    (glibc's malloc_trim; nothing elsewhere): such frees are gigabytes the allocator would otherwise keep."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)
