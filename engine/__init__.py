"""sd-engine: a Stable Diffusion inference engine with a torch-free runtime."""

from __future__ import annotations

__version__ = "0.1.0"
