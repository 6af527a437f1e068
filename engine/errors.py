"""User-facing errors: each one is a single line that names the problem.

The CLI prints ``str(error)`` and exits non-zero for any :class:`EngineError`; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error caused by the user's input, files or environment."""


class ModelFolderError(EngineError):
    """A diffusers model folder is missing, incomplete, corrupt or unsupported."""


class EngineFolderError(EngineError):
    """An engine folder is missing, incomplete, corrupt or from an incompatible version."""


class ParityError(EngineError):
    """A converted graph disagrees with its torch reference beyond tolerance."""


class MissingDependencyError(EngineError):
    """An optional dependency (torch, tensorrt, ...) is needed for this operation."""


class RequestError(EngineError, ValueError):
    """A generation setting is invalid (a ValueError too, so callers may catch either)."""


class Cancelled(EngineError):
    """A generation was cancelled by its step callback."""


class BuildError(EngineError):
    """A TensorRT plan could not be built (parser or builder failure), or a plan may not be used."""


class BuildOutOfMemoryError(BuildError):
    """The GPU ran out of memory while TensorRT built a plan."""
