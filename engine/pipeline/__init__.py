"""txt2img and img2img over an engine folder: one request value, the sampling loop, images."""

from __future__ import annotations

from engine.pipeline.pipeline import BackendName, GenerationResult, Pipeline
from engine.pipeline.request import GenerationRequest, StepControl, StepInfo

__all__ = ["BackendName", "GenerationRequest", "GenerationResult", "Pipeline", "StepControl", "StepInfo"]
