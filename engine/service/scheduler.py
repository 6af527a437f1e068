"""Queued generation: a bounded queue of jobs, one worker thread per engine, dynamic batching.

A job is one HTTP request: its images split into chunks (A1111's ``n_iter`` iterations, each cut to at
most ``max_batch`` images; chunk seeds continue the request's, so image i keeps seed + i). A worker
takes the oldest chunk of its engine and, within ``batch_window_ms``, every queued chunk with the same
:attr:`GenerationRequest.batch_key` up to ``max_batch`` images, and runs them as one UNet batch
(:meth:`Pipeline.run_batch`: each image still equals its solo image). Workers are threads: the
networks run in ONNX Runtime (or torch) with the GIL released, so the HTTP loop stays responsive.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from engine.errors import Cancelled, EngineError, RequestError
from engine.pipeline.request import GenerationRequest, StepControl, StepInfo
from engine.service.catalog import EngineEntry, PipelinePool
from engine.service.metrics import ServiceMetrics
from engine.service.progress import ProgressBoard

if TYPE_CHECKING:
    from engine.pipeline import GenerationResult

log = logging.getLogger("sd-engine.serve")

MAX_RETRY_AFTER_S = 60  # the openai SDK waits at most this long; beyond it clients should not retry
DEFAULT_SECONDS_PER_IMAGE = 1.0


class Rejected(Exception):
    """The queue refused a job: ``status`` 429 (full) or 503 (draining), ``retry_after`` in seconds."""

    def __init__(self, message: str, status: int, reason: str, retry_after: float) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


def split_request(
    request: GenerationRequest, n_iter: int, max_batch: int
) -> list[tuple[int, GenerationRequest]]:
    """(iteration, chunk) pairs: ``n_iter`` iterations of the request's batch, each cut into pieces of at
    most ``max_batch`` images; image i of the whole job keeps seed + i. One-prompt requests only."""
    chunks = []
    per_iteration = request.num_images
    for iteration in range(n_iter):
        first = 0
        while first < per_iteration:
            size = min(max_batch, per_iteration - first)
            seed = request.seed + iteration * per_iteration + first
            chunks.append((iteration, replace(request, batch_size=size, seed=seed)))
            first += size
    return chunks


@dataclass(eq=False)
class Job:
    """One request's work. Mutable state is guarded by the Scheduler's lock."""

    entry: EngineEntry
    chunks: Sequence[tuple[int, GenerationRequest]]
    kind: str  # "txt2img" or "img2img": A1111's progress job name
    iterations: int = 1
    created: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    state: JobState = JobState.QUEUED
    results: dict[int, GenerationResult] = field(default_factory=dict)
    done_chunks: int = 0
    started: bool = False
    started_at: float = 0.0  # time.time() of its first chunk's start: /progress's ETA and job_timestamp
    interrupted: bool = False
    cancel_reason: str | None = None

    @property
    def images(self) -> int:
        return sum(chunk.num_images for _, chunk in self.chunks)


@dataclass(frozen=True)
class Item:
    job: Job
    index: int

    @property
    def chunk(self) -> GenerationRequest:
        return self.job.chunks[self.index][1]


class Scheduler:
    """Admission, per-engine queues and workers. ``submit`` is called from the HTTP loop."""

    def __init__(
        self,
        pool: PipelinePool,
        board: ProgressBoard,
        metrics: ServiceMetrics,
        *,
        max_queue: int,
        max_batch: int,
        batch_window_ms: float,
    ) -> None:
        self.pool = pool
        self.board = board
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.window_s = batch_window_ms / 1000
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Item]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._queued: set[Job] = set()
        self._running: set[Job] = set()
        self._skip = False
        self._draining = False
        self._stopping = False
        self._seconds_per_image = DEFAULT_SECONDS_PER_IMAGE
        metrics.track_queue(lambda: len(self._queued), lambda: len(self._running))

    # -- the HTTP side ----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Rejected (draining: 503; queue full: 429 with a Retry-After)."""
        with self._cond:
            if self._draining:
                raise Rejected("the server is shutting down; retry on another instance", 503, "draining", 1)
            if len(self._queued) >= self.max_queue:
                wait = self._estimated_wait()
                raise Rejected(
                    f"the queue is full ({self.max_queue} requests waiting); retry later",
                    429,
                    "queue_full",
                    wait,
                )
            queue = self._queues.setdefault(job.entry.name, deque())
            queue.extend(Item(job, i) for i in range(len(job.chunks)))
            self._queued.add(job)
            self._ensure_worker(job.entry)
            self.board.set_queued(len(self._queued))
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str) -> bool:
        """Drop a job (its client went away or timed out). True when it had not started: nothing ran."""
        with self._cond:
            if job.state in (JobState.DONE, JobState.CANCELLED):
                return False
            started = job.started
            job.cancel_reason = reason
            if job.state is JobState.QUEUED:
                self._finish(job, JobState.CANCELLED, error=Cancelled(f"request {reason} before it started"))
                if started and not self._running:
                    self.board.idle()  # it was between two of its chunks, still on the board
            return not started

    def interrupt(self) -> int:
        """A1111's interrupt: every running job (also one between its iterations) stops at its next step and
        answers with what it has; its later chunks are dropped. Queued jobs that have not started are
        untouched; nothing is remembered when idle."""
        with self._cond:
            for job in self._running:
                job.interrupted = True
            between = [job for job in self._queued if job.started]  # waiting for its next iteration
            for job in between:
                job.interrupted = True
                self._finish(job, JobState.DONE)
            if self._running:
                self.board.flag(interrupted=True)
            elif between:
                self.board.idle()
            return len(self._running) + len(between)

    def skip(self) -> int:
        """A1111's skip: the running batch stops at its next step; its jobs go on with their next chunk."""
        with self._cond:
            if self._running:
                self._skip = True
                self.board.flag(skipped=True)
            return len(self._running)

    def queued_jobs(self) -> int:
        with self._cond:
            return len(self._queued)

    def in_flight(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queued) + len(self._running)

    def busy(self) -> bool:
        with self._cond:
            return bool(self._queued or self._running)

    def start_drain(self) -> None:
        with self._cond:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def stop(self) -> None:
        """End the workers (after wait_idle); queued work left is cancelled and a running batch stops at
        its next step (its requests fail with Cancelled), so a timed-out drain does not wait for it."""
        with self._cond:
            self._stopping = True
            for job in list(self._queued):
                self._finish(job, JobState.CANCELLED, error=Cancelled("the server stopped"))
            self._cond.notify_all()
        for worker in list(self._workers.values()):
            worker.join(timeout=5)

    def _estimated_wait(self) -> float:
        images = sum(job.images for job in self._queued) + sum(job.images for job in self._running)
        return max(1.0, images * self._seconds_per_image)

    @staticmethod
    def retry_after_headers(seconds: float) -> dict[str, str]:
        """Retry-After capped at 60 s (the openai SDK's limit); a longer wait adds x-should-retry: false."""
        headers = {"Retry-After": str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds))))}
        if seconds > MAX_RETRY_AFTER_S:
            headers["x-should-retry"] = "false"
        return headers

    # -- the worker side --------------------------------------------------------------------------

    def _ensure_worker(self, entry: EngineEntry) -> None:
        if entry.name not in self._workers:
            thread = threading.Thread(
                target=self._work, args=(entry,), name=f"worker-{entry.name}", daemon=True
            )
            self._workers[entry.name] = thread
            thread.start()

    def _work(self, entry: EngineEntry) -> None:
        while True:
            batch = self._next_batch(entry)
            if batch is None:
                return
            self._run(entry, batch)

    def _next_batch(self, entry: EngineEntry) -> list[Item] | None:
        """Wait for work; then the oldest live chunk and, within the window, compatible ones."""
        queue = self._queues[entry.name]
        with self._cond:
            while True:
                self._drop_dead(queue)
                if queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            batch = self._gather(queue, [])
            deadline = time.monotonic() + self.window_s
            while sum(i.chunk.num_images for i in batch) < self.max_batch and batch[0].chunk.batch_key:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
                batch = self._gather(queue, batch)
            for item in batch:
                self._start(item.job)
            return batch

    def _gather(self, queue: deque[Item], batch: list[Item]) -> list[Item]:
        """Move queued items compatible with ``batch`` (or the head, when empty) into it, in queue order,
        never taking a job's chunk ahead of an earlier chunk of the same job."""
        self._drop_dead(queue)
        if not batch:
            batch = [queue.popleft()]
        key = batch[0].chunk.batch_key
        if key is None:
            return batch
        images = sum(i.chunk.num_images for i in batch)
        blocked = {id(i.job) for i in batch}  # a job's chunks run one after another (A1111's iterations)
        for item in list(queue):
            fits = item.chunk.batch_key == key and images + item.chunk.num_images <= self.max_batch
            if fits and id(item.job) not in blocked:
                queue.remove(item)
                batch.append(item)
                images += item.chunk.num_images
            else:
                blocked.add(id(item.job))
        return batch

    def _drop_dead(self, queue: deque[Item]) -> None:
        while queue and queue[0].job.state in (JobState.DONE, JobState.CANCELLED):
            queue.popleft()
        for item in [i for i in queue if i.job.state in (JobState.DONE, JobState.CANCELLED)]:
            queue.remove(item)

    def _start(self, job: Job) -> None:
        if job.state is JobState.QUEUED:
            job.state = JobState.RUNNING
            self._queued.discard(job)
            self._running.add(job)
            if not job.started:
                job.started = True
                job.started_at = time.time()
                self.metrics.queue_wait.observe(time.monotonic() - job.created)
            self.board.set_queued(len(self._queued))

    def _run(self, entry: EngineEntry, batch: list[Item]) -> None:
        first = batch[0]
        jobs = list(dict.fromkeys(item.job for item in batch))
        iteration = first.job.chunks[first.index][0]
        started = first.job.started_at or time.time()
        self.board.start(first.job.kind, first.job.iterations, iteration, first.chunk.steps, started)
        begin = time.monotonic()
        try:
            pipeline = self.pool.acquire(entry)
        except Exception as error:  # a model that fails to load fails its requests, not the server
            log.exception("loading %s failed", entry.name)
            self._fail(jobs, EngineError(f"loading model {entry.name} failed: {error}"))
            return
        try:
            results = pipeline.run_batch([item.chunk for item in batch], self._on_step(jobs))
        except (RequestError, Cancelled) as error:
            if self._stopping and isinstance(error, Cancelled):
                error = Cancelled(f"the server stopped before the request finished ({error})")
            self._fail(jobs, error)
            return
        except Exception as error:
            log.exception("generation failed on %s", entry.name)
            self._fail(jobs, EngineError(f"generation failed: {type(error).__name__}: {error}"))
            return
        finally:
            self.pool.release(entry)
            with self._cond:
                self._skip = False
                if not any(self._continues(item.job) for item in batch):
                    self.board.idle()  # a job with chunks left keeps the board until its next chunk starts
        seconds = time.monotonic() - begin
        images = sum(item.chunk.num_images for item in batch)
        self.metrics.observe_batch(images, seconds, results[0].steps_done or 0)
        self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * seconds / max(images, 1)
        self._deliver(batch, results)

    def _on_step(self, jobs: list[Job]):
        def on_step(info: StepInfo) -> StepControl:
            self.board.step(info.step, info.total, info.latents)
            with self._cond:
                if self._stopping or all(job.cancel_reason for job in jobs):
                    return StepControl.CANCEL
                if self._skip or any(job.interrupted for job in jobs):
                    return StepControl.STOP
            return StepControl.CONTINUE

        return on_step

    def _continues(self, job: Job) -> bool:
        """Under the lock: whether the job has chunks left to run after the one now ending."""
        if job.state is not JobState.RUNNING or job.interrupted or job.cancel_reason:
            return False
        return job.done_chunks + 1 < len(job.chunks)

    def _deliver(self, batch: list[Item], results: list[GenerationResult]) -> None:
        with self._cond:
            for item, result in zip(batch, results, strict=True):
                job = item.job
                job.results[item.index] = result
                job.done_chunks += 1
                if job.cancel_reason:
                    self._finish(job, JobState.CANCELLED, error=Cancelled(f"request {job.cancel_reason}"))
                elif job.interrupted or job.done_chunks == len(job.chunks):
                    self._finish(job, JobState.DONE)
                else:
                    job.state = JobState.QUEUED  # its next chunk waits in the queue, first of its job
                    self._running.discard(job)
                    self._queued.add(job)
            self._cond.notify_all()

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        with self._cond:
            for job in jobs:
                self._finish(job, JobState.CANCELLED, error=error)
            self._cond.notify_all()

    def _finish(self, job: Job, state: JobState, error: Exception | None = None) -> None:
        """Under the lock: end a job and settle its future (results in chunk order, or the error)."""
        job.state = state
        self._queued.discard(job)
        self._running.discard(job)
        self.board.set_queued(len(self._queued))
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result([job.results[i] for i in sorted(job.results)])
        self._cond.notify_all()
