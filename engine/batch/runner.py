"""What every runner of a batch render shares: its settings and its interface.

A runner renders batches of work items (each batch: compatible items, at most ``--batch``) with one
pipeline per worker and reports every item's :class:`engine.batch.worker.ItemResult` to the driver
through ``on_result``, in completion order. The driver alone writes the ledger. A worker that dies
(crash, kill, lost Ray node) has its items retried, up to ``max_tries`` runs per item; past that the
item comes back as an error, so a render always ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engine.batch.items import WorkItem
from engine.batch.worker import ItemResult

MAX_TRIES = 3

ResultCallback = Callable[[ItemResult], None]


@dataclass(frozen=True)
class RenderSettings:
    """How to render: the engine folder and backend each worker loads, where PNGs go, how many
    workers (processes or Ray actors), ``ray_address`` (None: no Ray; "auto"/"" : start or join a local
    Ray; "HOST:PORT": a cluster from ``ray start --head``), the tries per item, and ``lora_dir``, where
    prompts' ``<lora:NAME>`` tags find LoRA files (on every node)."""

    engine_dir: Path
    out_dir: Path
    backend: str = "onnxruntime"
    workers: int = 1
    ray_address: str | None = None
    max_tries: int = MAX_TRIES
    lora_dir: Path | None = None


class Runner(Protocol):
    def run(self, batches: Sequence[Sequence[WorkItem]], on_result: ResultCallback) -> None:
        """Render every batch; call ``on_result`` once per item (success or error). Returns when all
        items have a result. Raises EngineError only for a failure of the runner itself (a worker
        that cannot load the engine, a Ray cluster that cannot be reached)."""
        ...
