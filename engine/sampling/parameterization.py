"""Model output to the denoised estimate x0: the one place that knows eps / v / sample prediction.

Every sampler sees its sample ``x`` through a variance-preserving lens: ``scale * x`` has the form
``alpha * x0 + sigma * eps`` (``scale`` is 1 for DDIM-style samples and 1 / sqrt(1 + s^2) for
Karras-style samples of noise level s). Both estimates are then linear in (x, model_output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Prediction


def vp_of_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of the variance-preserving process at Karras noise level ``sigma``."""
    alpha = 1.0 / np.sqrt(np.asarray(sigma, dtype=np.float64) ** 2 + 1.0)
    return alpha, sigma * alpha


def x0_coefficients(
    prediction: Prediction, alpha: np.ndarray, sigma: np.ndarray, scale: np.ndarray | float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(skip, out) with x0 = skip * x + out * model_output."""
    alpha, sigma = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction is Prediction.EPSILON:
            return scale / alpha, -sigma / alpha
        if prediction is Prediction.V_PREDICTION:
            return alpha * scale, -sigma
    return np.zeros_like(alpha), np.ones_like(alpha)


def eps_coefficients(
    prediction: Prediction, alpha: np.ndarray, sigma: np.ndarray, scale: np.ndarray | float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(skip, out) with eps = skip * x + out * model_output."""
    alpha, sigma = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction is Prediction.EPSILON:
            return np.zeros_like(alpha), np.ones_like(alpha)
        if prediction is Prediction.V_PREDICTION:
            return sigma * scale, alpha
        return scale / sigma, -alpha / sigma


@dataclass(frozen=True)
class Denoiser:
    """Per-evaluation coefficients of x0 = clip(skip * x + out * model_output)."""

    skip: np.ndarray
    out: np.ndarray
    clip: float | None = None

    def __post_init__(self) -> None:
        if not (np.all(np.isfinite(self.skip)) and np.all(np.isfinite(self.out))):
            raise ValueError(
                "the denoised estimate is undefined at zero SNR for this prediction_type "
                "(rescale_betas_zero_snr needs v_prediction)"
            )

    def __call__(self, model_output: Any, sample: Any, i: int) -> Any:
        skip, out = float(self.skip[i]), float(self.out[i])
        x0 = model_output * out if skip == 0.0 else sample * skip + model_output * out
        return x0 if self.clip is None else x0.clip(-self.clip, self.clip)

    def tail(self, begin: int) -> Denoiser:
        return Denoiser(self.skip[begin:], self.out[begin:], self.clip)


def make_denoiser(
    prediction: Prediction,
    alpha: np.ndarray,
    sigma: np.ndarray,
    scale: np.ndarray | float = 1.0,
    clip: float | None = None,
) -> Denoiser:
    skip, out = x0_coefficients(prediction, alpha, sigma, scale)
    return Denoiser(skip, out, clip)


def karras_denoiser(prediction: Prediction, sigma_in: np.ndarray, clip: float | None = None) -> Denoiser:
    """Denoiser for samples at Karras noise level ``sigma_in`` (x0 = x - sigma * eps for eps models)."""
    alpha, sigma = vp_of_sigma(sigma_in)
    skip, out = x0_coefficients(prediction, alpha, sigma, alpha)
    if prediction is Prediction.EPSILON:  # exact forms, as diffusers writes them
        skip, out = np.ones_like(alpha), -np.asarray(sigma_in, dtype=np.float64)
    return Denoiser(skip, out, clip)
