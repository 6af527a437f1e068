"""``--workers N``: render in N local worker processes, one pipeline each.

Every worker is a spawned process (also for N = 1), so a crash inside a native library (a segfault, the
OOM killer) costs one batch, not the render: the driver knows which batch each worker holds, retries
those items one at a time in a fresh worker, and gives an item up after ``max_tries`` runs. Workers get
``PR_SET_PDEATHSIG``: a driver killed with kill -9 takes its workers with it, so a rerun never races an
orphan. ONNX Runtime / OpenVINO threads are split between the workers (physical cores / N each).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from engine.batch.items import WorkItem
from engine.batch.runner import RenderSettings, ResultCallback
from engine.batch.worker import ItemResult
from engine.errors import EngineError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
THREADED_BACKENDS = ("onnxruntime", "openvino")


def worker_main(connection: Connection, settings: RenderSettings, threads: int | None) -> None:
    """A worker process: load the pipeline, then render each batch it is sent until it gets None.

    Messages to the driver: ("ready",), ("load_error", line), ("results", [ItemResult json, ...]).
    """
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    from engine.batch.worker import render_items
    from engine.pipeline import Pipeline

    options: dict[str, Any] = {"threads": threads} if threads else {}
    try:
        pipe = Pipeline.load(
            settings.engine_dir, backend=settings.backend, lora_dir=settings.lora_dir, **options
        )
    except EngineError as error:
        connection.send(("load_error", str(error)))
        return
    connection.send(("ready",))
    while (message := _receive(connection)) is not None:
        items = [WorkItem.from_json(data) for data in message]
        results = render_items(pipe, items, settings.out_dir)
        connection.send(("results", [result.to_json() for result in results]))


def _receive(connection: Connection) -> Any:
    try:
        return connection.recv()
    except (EOFError, OSError):  # the driver is gone
        return None


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the driver dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    connection: Connection
    ready: bool = False
    batch: list[WorkItem] | None = None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


@dataclass
class _Queue:
    """Batches waiting, and how many times each item has been tried."""

    pending: deque[list[WorkItem]]
    tries: dict[str, int] = field(default_factory=dict)


class LocalRunner:
    """The Runner of engine.batch.runner over ``settings.workers`` spawned processes.

    ``worker_target``: the worker's main function, ``(connection, settings, threads)``; a subclass may
    wrap it (the tests inject real crashes this way)."""

    worker_target = staticmethod(worker_main)

    def __init__(self, settings: RenderSettings) -> None:
        if settings.workers < 1:
            raise EngineError(f"--workers must be at least 1, got {settings.workers}")
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")

    def threads_per_worker(self) -> int | None:
        if self.settings.backend not in THREADED_BACKENDS:
            return None
        from engine.machine import physical_cores

        return max(1, physical_cores() // self.settings.workers)

    def run(self, batches: Sequence[Sequence[WorkItem]], on_result: ResultCallback) -> None:
        queue = _Queue(deque(list(batch) for batch in batches if batch))
        count = min(self.settings.workers, len(queue.pending))
        workers = [self._start() for _ in range(count)]
        load_failures = 0
        try:
            while True:
                for index, worker in enumerate(workers):
                    if self._serve(worker, queue, on_result):
                        continue
                    load_failures += 0 if worker.ready else 1
                    if load_failures >= self.settings.max_tries:
                        raise EngineError(
                            f"render workers died {load_failures} times while loading "
                            f"{self.settings.engine_dir}"
                        )
                    worker.stop()
                    workers[index] = self._start()
                for worker in workers:
                    if worker.ready and worker.batch is None and queue.pending:
                        worker.batch = queue.pending.popleft()
                        worker.connection.send([item.to_json() for item in worker.batch])
                if not queue.pending and not any(w.batch for w in workers):
                    return
                _wait_any(workers)
        finally:
            for worker in workers:
                worker.stop()

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=self.worker_target, args=(child, self.settings, self.threads_per_worker()), daemon=True
        )
        with _ctrl_c_held():
            process.start()
        child.close()
        return _Worker(process, parent)

    def _serve(self, worker: _Worker, queue: _Queue, on_result: ResultCallback) -> bool:
        """Read what a worker sent; False when it died (its batch then goes back to the queue)."""
        try:
            while worker.connection.poll():
                message = worker.connection.recv()
                if message[0] == "load_error":
                    raise EngineError(message[1])
                if message[0] == "ready":
                    worker.ready = True
                else:
                    worker.batch = None
                    for data in message[1]:
                        on_result(ItemResult.from_json(data))
        except (EOFError, OSError):
            pass
        if worker.process.is_alive():
            return True
        self._requeue(worker, queue, on_result)
        return False

    def _requeue(self, worker: _Worker, queue: _Queue, on_result: ResultCallback) -> None:
        """A dead worker's items: tried again alone (to find the one that kills), or given up."""
        code = worker.process.exitcode
        for item in worker.batch or []:
            tries = queue.tries[item.key] = queue.tries.get(item.key, 0) + 1
            if tries >= self.settings.max_tries:
                error = f"the worker died {tries} times rendering this item (last exit code {code})"
                on_result(ItemResult(item.key, item.file, error=error))
            else:
                queue.pending.appendleft([item])
        if worker.batch:
            log.warning("a render worker died (exit code %s) holding %d items", code, len(worker.batch))
        worker.batch = None


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """SIGINT blocked while a worker starts. The child inherits the blocked mask through exec, so a
    Ctrl-C of the terminal's process group never prints a worker's KeyboardInterrupt traceback while
    it imports (workers ignore SIGINT anyway); the driver gets a Ctrl-C that arrived meanwhile as soon
    as the mask is restored, so none is lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_any(workers: Sequence[_Worker]) -> None:
    """Block until a worker sends something or dies."""
    handles: list[Any] = [w.connection for w in workers] + [w.process.sentinel for w in workers]
    wait(handles, timeout=5)
