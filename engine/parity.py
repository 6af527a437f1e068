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


def rel_l2(reference: np.ndarray, actual: np.ndarray) -> float:
    """Relative L2 error ``||actual - reference||_2 / ||reference||_2`` in float64 (denominator at least
    1e-30); inf when ``actual`` holds a NaN or an infinity. Any shapes that broadcast."""
    reference64, actual64 = np.asarray(reference, np.float64), np.asarray(actual, np.float64)
    if not np.all(np.isfinite(actual64)):
        return float("inf")
    return float(np.linalg.norm(actual64 - reference64) / max(np.linalg.norm(reference64), 1e-30))


def max_abs(reference: np.ndarray, actual: np.ndarray) -> float:
    """Largest element-wise ``|actual - reference|``, in float64 (so uint8 images do not wrap)."""
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(reference, np.float64))))


def psnr(reference: np.ndarray, actual: np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio ``10 log10(peak^2 / mean((actual - reference)^2))`` in dB, in float64;
    inf when the two are equal. ``peak`` is the signal's range: 255 for uint8 images."""
    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def compare(expected: np.ndarray, actual: np.ndarray, sizes: Mapping[str, int]) -> ParityReport:
    """Relative L2, max-abs and PSNR (peak = the reference's range, 1 when constant) against expected."""
    peak = float(np.ptp(np.asarray(expected, np.float64))) or 1.0
    return ParityReport(
        dict(sizes), rel_l2(expected, actual), max_abs(expected, actual), psnr(expected, actual, peak)
    )
