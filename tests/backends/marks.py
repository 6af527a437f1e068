"""Skip marks for the tests that need a CUDA GPU (marks, not fixtures: a session-scoped fixture such
as tiny_engine would be built before a fixture could skip)."""

from __future__ import annotations

import pytest


def cuda_skip_reason() -> str | None:
    """Why no CUDA GPU can be used here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none"
    return None


needs_cuda = pytest.mark.skipif(cuda_skip_reason() is not None, reason=str(cuda_skip_reason()))
