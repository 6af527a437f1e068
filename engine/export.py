"""Export's face: a diffusers model folder -> a parity-gated ONNX engine folder, or with
``ExportSettings(torch_only=True)`` a manifest and tokenizer only, for the torch backends.

The implementation lives in :mod:`engine.onnx` (tracing, conversion and parity gate, the fused-guidance
graph, attention fusion for ONNX Runtime).
"""

from __future__ import annotations

from engine.onnx.convert import ExportResult, ExportSettings, export_model

__all__ = ["ExportResult", "ExportSettings", "export_model"]
