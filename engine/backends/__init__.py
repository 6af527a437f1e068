"""Backends: each runs an engine folder's graphs behind :class:`engine.runtime.Graph`, opened through
:func:`engine.runtime.open_backend` (``open_engine(engine_dir, manifest, options)`` in every module).

No module here imports export or build code; only torch_cpu and torch_cuda import torch, lazily.
"""
