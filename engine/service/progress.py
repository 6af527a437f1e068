"""What /sdapi/v1/progress reports: the running job's step, written by the worker and read by the
HTTP loop under a short lock, so a progress poll never waits on the generation."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Snapshot:
    """The state of the running job (A1111's ``shared.state``), or idle when ``job`` is empty."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0  # time.time() of the job's start
    job_timestamp: str = "0"
    queued: int = 0
    skipped: bool = False
    interrupted: bool = False
    preview: np.ndarray | None = None  # latents of the first image at the last preview step
    preview_step: int = 0

    @property
    def progress(self) -> float:
        """A1111's formula: (job_no + sampling_step / sampling_steps) / job_count, 0 when idle."""
        if not self.job or self.job_count <= 0:
            return 0.0
        done = self.job_no + (self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0)
        return min(max(done / self.job_count, 0.0), 1.0)

    def eta_relative(self, now: float) -> float:
        """Seconds left, extrapolated from the time so far (A1111's estimate); 0 when idle."""
        progress = self.progress
        if progress <= 0:
            return 0.0
        elapsed = max(now - self.started, 0.0)
        return elapsed / progress - elapsed

    def state(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }


class ProgressBoard:
    """The latest Snapshot; the worker replaces it, readers take it whole."""

    def __init__(self, preview_every: int) -> None:
        self.preview_every = preview_every
        self._lock = threading.Lock()
        self._snapshot = Snapshot()

    def read(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def start(self, job: str, job_count: int, job_no: int, steps: int, started: float) -> None:
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(started))
        with self._lock:
            queued = self._snapshot.queued
            self._snapshot = Snapshot(job, job_count, job_no, 0, steps, started, stamp, queued)

    def step(self, step: int, total: int, latents: np.ndarray | None) -> None:
        take = latents is not None and self.preview_every > 0 and (step % self.preview_every == 0)
        with self._lock:
            s = self._snapshot
            preview, preview_step = (latents[:1], step) if take else (s.preview, s.preview_step)
            self._snapshot = _replace(
                s, sampling_step=step, sampling_steps=total, preview=preview, preview_step=preview_step
            )

    def flag(self, **flags: bool) -> None:
        with self._lock:
            if self._snapshot.job:
                self._snapshot = _replace(self._snapshot, **flags)

    def set_queued(self, queued: int) -> None:
        with self._lock:
            self._snapshot = _replace(self._snapshot, queued=queued)

    def idle(self) -> None:
        with self._lock:
            self._snapshot = Snapshot(queued=self._snapshot.queued)


def _replace(snapshot: Snapshot, **changes: Any) -> Snapshot:
    from dataclasses import replace

    return replace(snapshot, **changes)
