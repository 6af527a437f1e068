"""Classifier-free guidance: the UNet's inputs for plain and fused guidance, and the host-side combine."""

from __future__ import annotations

import numpy as np

from engine.pipeline.request import GenerationRequest


def unet_feeds(
    model_in: np.ndarray, t: float, context: np.ndarray, request: GenerationRequest
) -> dict[str, np.ndarray]:
    """Plain UNet inputs: the latents twice under guidance (negatives first, as the context)."""
    sample = np.concatenate([model_in, model_in]) if request.do_cfg else model_in
    timestep = np.full((sample.shape[0],), t, dtype=np.float32)
    return {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}


def fused_feeds(
    model_in: np.ndarray, t: float, context: np.ndarray, request: GenerationRequest
) -> dict[str, np.ndarray]:
    """unet_cfg inputs: B latents, 2B embeddings, the scale; the graph doubles and combines."""
    return {
        "sample": model_in,
        "timestep": np.full((model_in.shape[0],), t, dtype=np.float32),
        "encoder_hidden_states": context,
        "guidance_scale": np.array([request.guidance_scale], dtype=np.float32),
    }


def guide(noise_pred: np.ndarray, request: GenerationRequest) -> np.ndarray:
    """Classifier-free guidance with optional rescale (Lin et al. 2023, sec. 3.4), as diffusers."""
    if not request.do_cfg:
        return noise_pred
    uncond, text = np.split(noise_pred, 2)
    guided = uncond + np.float32(request.guidance_scale) * (text - uncond)
    if request.guidance_rescale > 0:
        axes = tuple(range(1, guided.ndim))
        std_text = text.std(axis=axes, keepdims=True, ddof=1)
        std_cfg = guided.std(axis=axes, keepdims=True, ddof=1)
        rescaled = guided * (std_text / std_cfg)
        phi = np.float32(request.guidance_rescale)
        guided = phi * rescaled + (1 - phi) * guided
    return guided.astype(np.float32)
