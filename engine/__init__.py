"""sd-engine: a Stable Diffusion inference engine with a torch-free runtime."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["GenerationResult", "Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the pipeline on first use, so `import engine` stays cheap for the CLI."""
    if name in ("Pipeline", "GenerationResult"):
        from engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
