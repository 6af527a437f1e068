"""`sd-engine serve`: the A1111 and OpenAI Images APIs over the engine (FastAPI on uvicorn).

The HTTP layer only turns requests into :class:`engine.pipeline.GenerationRequest` values; the
:mod:`engine.service.scheduler` runs them (bounded queue, dynamic batching, progress), and
:mod:`engine.service.server` handles signals and the drain. Needs the ``serve`` extra.
"""

from __future__ import annotations

from engine.service.config import Limits, ServeConfig

__all__ = ["Limits", "ServeConfig"]
