"""Classifier-free guidance: the UNet's inputs for plain and fused guidance, and the host-side combine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engine.pipeline.request import GenerationRequest


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning, one row per (text, image), negatives first under guidance.

    context: the text embeddings (N, S, D) float32 (``encoder_hidden_states``); added: SDXL's
    "text_time" inputs, ``text_embeds`` (N, P) and ``time_ids`` (N, 6) float32; empty for SD 1.x / 2.x.
    """

    context: np.ndarray
    added: Mapping[str, np.ndarray] = field(default_factory=dict)

    def inputs(self) -> dict[str, np.ndarray]:
        return {"encoder_hidden_states": self.context, **self.added}

    def repeat(self, count: int) -> Conditioning:
        """Every row repeated ``count`` times in place (one per image of a prompt)."""
        added = {name: value.repeat(count, axis=0) for name, value in self.added.items()}
        return Conditioning(self.context.repeat(count, axis=0), added)


def unet_feeds(
    model_in: np.ndarray, t: float, cond: Conditioning, request: GenerationRequest
) -> dict[str, np.ndarray]:
    """Plain UNet inputs: the latents twice under guidance (negatives first, as the conditioning)."""
    sample = np.concatenate([model_in, model_in]) if request.do_cfg else model_in
    timestep = np.full((sample.shape[0],), t, dtype=np.float32)
    return {"sample": sample, "timestep": timestep, **cond.inputs()}


def fused_feeds(
    model_in: np.ndarray, t: float, cond: Conditioning, request: GenerationRequest
) -> dict[str, np.ndarray]:
    """unet_cfg inputs: B latents, 2B conditioning rows, the scale; the graph doubles and combines."""
    return {
        "sample": model_in,
        "timestep": np.full((model_in.shape[0],), t, dtype=np.float32),
        **cond.inputs(),
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
