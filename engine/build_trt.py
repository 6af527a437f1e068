"""TensorRT build's face: an ONNX engine folder -> parity-gated TensorRT plans.

The implementation lives in :mod:`engine.tensorrt`: ``profiles`` (shape profiles from the spec tables),
``plans`` (plan keys, sidecars and plans.json, which the tensorrt backend reads too), ``env`` (tensorrt,
cuda-python and the GPU) and ``builder`` (plans, parity gate, index).
"""

from __future__ import annotations

from engine.tensorrt.builder import BuildSettings, PlanResult, Rebuild, build_engine
from engine.tensorrt.profiles import (
    DefaultSizes,
    ProfileKind,
    ShapeProfile,
    default_profiles,
    default_sizes,
    make_profiles,
)

__all__ = [
    "BuildSettings",
    "DefaultSizes",
    "PlanResult",
    "ProfileKind",
    "Rebuild",
    "ShapeProfile",
    "build_engine",
    "default_profiles",
    "default_sizes",
    "make_profiles",
]
