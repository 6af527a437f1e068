"""Agreement of a converted graph or image with its reference: relative L2, max-abs and PSNR.

One definition used by export, the TensorRT build, the benchmark harness and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ParityReport:
    """Agreement of a graph with its torch reference at one input shape."""

    sizes: Mapping[str, int]
    rel_l2: float
    max_abs: float
    psnr_db: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sizes": dict(self.sizes),
            "rel_l2": self.rel_l2,
            "max_abs": self.max_abs,
            "psnr_db": self.psnr_db,
        }


def summarize_parity(reports: list[ParityReport], threshold: float, seed: int) -> dict[str, Any]:
    """The manifest's parity record: worst numbers over every shape and output, and each check."""
    worst = max(reports, key=lambda r: r.rel_l2)
    return {
        "passed": bool(worst.rel_l2 <= threshold),
        "threshold_rel_l2": threshold,
        "worst_rel_l2": worst.rel_l2,
        "worst_max_abs": max(r.max_abs for r in reports),
        "min_psnr_db": min(r.psnr_db for r in reports),
        "seed": seed,
        "checks": [r.to_json() for r in reports],
    }


def compare(expected: np.ndarray, actual: np.ndarray, sizes: Mapping[str, int]) -> ParityReport:
    """Relative L2, max-abs and PSNR (peak = the reference's range) of actual against expected."""
    expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
    diff = actual64 - expected64
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(expected64), 1e-30))
    mse = float(np.mean(diff**2))
    peak = float(np.ptp(expected64)) or 1.0
    psnr = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
    if not np.all(np.isfinite(actual64)):
        rel = float("inf")
    return ParityReport(dict(sizes), rel, float(np.max(np.abs(diff))), psnr)
