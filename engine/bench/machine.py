"""What a benchmark was measured on: CPU, cores, memory, OS, Python and library versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from engine import __version__

PARENT_PACKAGES = ("numpy", "onnxruntime", "tokenizers", "pillow")


def _proc_field(path: str, key: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def memory_gib() -> float | None:
    total = _proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    return round(int(total.split()[0]) / 2**20, 1) if total else None


def machine_info() -> dict[str, Any]:
    from engine.machine import physical_cores

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": physical_cores(),
        "memory_gib": memory_gib(),
        "os": platform.platform(),
    }


def machine_kind(machine: dict[str, Any], device: str) -> str:
    """A short name for file names: ``cpu-2core``, ``cuda-16core``."""
    return f"{device}-{machine.get('usable_cores') or machine.get('logical_cores')}core"


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the packages in ``names`` that are installed (read without importing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def software_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sd_engine": __version__,
        "git_commit": git_commit(),
        **package_versions(PARENT_PACKAGES),
    }


def git_commit() -> str | None:
    """The checkout's HEAD commit when sd-engine runs from a git checkout (read-only)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
