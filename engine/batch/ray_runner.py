"""Render on Ray: Ray Data ``map_batches`` over an actor pool, one pipeline per actor.

Each pre-formed batch (compatible items, at most ``--batch``) travels as one Ray Data row, so Ray never
mixes items of different batches. An actor renders a row with :func:`engine.batch.worker.render_items`
(PNGs written atomically, straight into OUT_DIR) and hands back one row per item; the driver streams
those rows to ``on_result`` as they arrive and alone keeps the ledger.

Failures, from the cheapest to the last resort:

- a bad item (bad setting, unreadable request, unwritable file): caught inside the actor and returned
  as an error result; Ray's own retries never see exceptions of the map function, so this is the only
  thing that keeps one bad row from aborting the job;
- a lost actor (process killed, node gone): Ray restarts it and reruns its batch, ``max_tries - 1``
  times (``max_restarts`` / ``max_task_retries``);
- a dataset that still fails (a batch that keeps crashing its worker): the items that got no result
  run again in a fresh dataset, ``max_tries`` datasets in all; then each comes back as an error
  ("worker crashed N times: ..."), so a render always ends. A batch that kills every worker it meets
  runs at most ``max_tries ** 2`` times.

Ray is imported only here, lazily: ``engine.batch`` imports without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.batch.items import WorkItem
from engine.batch.runner import RenderSettings, ResultCallback
from engine.batch.worker import ItemResult, render_items
from engine.errors import EngineError, MissingDependencyError

log = logging.getLogger(__name__)

RAY_INSTALL = 'install the extra: pip install -e ".[ray]"'
LOCAL_ADDRESSES = ("", "auto", "local")  # start a local Ray, or join the one running on this machine
CONNECT_TIMEOUT_S = 5.0  # to reach a cluster's GCS port before ray.init (which retries for minutes)
THREADED_BACKENDS = ("onnxruntime", "openvino")  # backends with a ``threads`` option
AUTH_HINT = (
    " (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN"
    " or ~/.ray/auth_token)"
)
ERROR_CHARS = 300  # of a Ray error's message in an item's error

ItemId = tuple[str, str]  # (key, file): two rows with the same request share a key, never a file


def import_ray() -> ModuleType:
    """The ``ray`` module with Ray Data, or a one-line MissingDependencyError naming the extra."""
    try:
        import ray
        import ray.data  # Ray without its [data] extra has none
    except ImportError as error:
        raise MissingDependencyError(f"rendering on Ray needs ray[data] ({error}); {RAY_INSTALL}") from None
    return ray


def describe(error: BaseException) -> str:
    """``<type>: <first line of the message>``, at most ERROR_CHARS characters (Ray's messages carry
    whole tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


# -- the actor ------------------------------------------------------------------------------------


def render_row(pipe: Any, row: str, out_dir: Path) -> list[ItemResult]:
    """Render one batch (``row``: a JSON list of WorkItem.to_json()); one result per item, in order.

    An exception render_items lets through (an unparsable request, an unwritable OUT_DIR, a bug) is
    caught: a batch that fails runs again one item at a time so only the bad item is marked."""
    items = [WorkItem.from_json(data) for data in json.loads(row)]
    try:
        return render_items(pipe, items, out_dir)
    except Exception:  # any error of one row must come back as a result, never abort the job
        return [render_alone(pipe, item, out_dir) for item in items]


def render_alone(pipe: Any, item: WorkItem, out_dir: Path) -> ItemResult:
    """One item; any exception becomes its error result."""
    try:
        return render_items(pipe, [item], out_dir)[0]
    except Exception as error:  # see render_row
        return ItemResult(item.key, item.file, error=describe(error))


class RenderActor:
    """A Ray Data actor: one pipeline, loaded once, rendering one pre-formed batch per call.

    A pipeline that cannot load, or an OUT_DIR this node does not have, is not raised here (Ray Data
    would fail the job with a traceback, or replace the actor over and over): each call then returns
    one row whose ``fatal`` names the problem, and the driver stops the render with an EngineError."""

    def __init__(self, engine_dir: str, backend: str, out_dir: str, options: dict[str, Any]) -> None:
        from engine.pipeline import Pipeline

        self.out_dir = Path(out_dir)
        self.pipe: Any = None
        self.fatal = ""
        where = f"a Ray worker on {socket.gethostname()}"
        if not self.out_dir.is_dir():  # PNGs must land where the driver looks: a folder all nodes share
            self.fatal = f"{where} has no folder {out_dir}: OUT_DIR must be shared by every node"
            return
        try:
            self.pipe = Pipeline.load(engine_dir, backend=backend, **options)
        except Exception as error:  # reported to the driver, see the class docstring
            self.fatal = f"{where} cannot load {engine_dir}: {describe(error)}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """``batch["batch"]``: the rows (batch_size=1: one) -> ``{"result": [ItemResult JSON, ...],
        "fatal": [...]}`` (fatal empty unless the pipeline did not load)."""
        if self.fatal:
            return {"result": [""], "fatal": [self.fatal]}
        results = [
            result for row in batch["batch"] for result in render_row(self.pipe, str(row), self.out_dir)
        ]
        return {"result": [json.dumps(r.to_json()) for r in results], "fatal": [""] * len(results)}


# -- resources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorResources:
    """What each actor asks Ray for: ``num_gpus`` 1 where the cluster has GPUs (``workers`` capped
    at their count), else ``num_cpus`` so that ``workers`` actors fit, with as many ONNX Runtime
    threads as whole CPUs (None: the backend decides)."""

    workers: int
    num_cpus: float | None = None
    num_gpus: float | None = None
    threads: int | None = None


def plan_resources(node_cpus: Sequence[float], gpus: float, workers: int) -> ActorResources:
    """``node_cpus``: the CPUs of each alive node; ``gpus``: the cluster's GPUs."""
    workers = max(1, workers)
    if gpus >= 1:
        return ActorResources(min(workers, int(gpus)), num_gpus=1.0)
    share = cpus_per_actor(node_cpus, workers)
    return ActorResources(workers, num_cpus=share, threads=max(1, int(share)))


def cpus_per_actor(node_cpus: Sequence[float], workers: int) -> float:
    """The most CPUs per actor that still places ``workers`` actors, each on one node: whole CPUs
    where there are enough (Ray takes no fraction above 1), else 1/k of a CPU."""
    largest = int(max(node_cpus, default=0))
    for share in range(largest, 0, -1):
        if sum(int(cpus // share) for cpus in node_cpus) >= workers:
            return float(share)
    for parts in range(2, 10_000):
        if sum(math.floor(cpus * parts) for cpus in node_cpus) >= workers:
            return round(1.0 / parts, 4)
    return 0.0001  # Ray's smallest quantum: a cluster without CPUs still schedules


# -- connecting -----------------------------------------------------------------------------------


def connect(ray: ModuleType, address: str | None) -> bool:
    """Join or start Ray; True when this call connected (the caller then calls ``ray.shutdown()``,
    which stops a local Ray started here and only disconnects from a cluster joined).

    Already connected in this process: that Ray is used as it is. ``address`` None, "", "auto" or
    "local": the Ray of this machine (RAY_ADDRESS, else the one ``ray start`` recorded), else a new
    local one. "HOST:PORT" (or "ray://HOST:PORT"): that cluster. Unreachable: a one-line EngineError
    naming the address (ray.init itself would retry it for minutes)."""
    if ray.is_initialized():
        return False
    target = (address or "").strip()
    local = target.lower() in LOCAL_ADDRESSES
    if local:
        target = local_address()
    elif not reachable(target):
        raise EngineError(f"cannot reach the Ray cluster at {target} (is `ray start --head` running there?)")
    quiet = {"log_to_driver": False, "include_dashboard": False, "logging_level": logging.WARNING}
    try:
        ray.init(address=target if not local else None if target else "local", **quiet)
    except Exception as error:  # Ray raises many kinds; the user needs one line
        where = f"the Ray cluster at {target}" if target else "a local Ray"
        raise EngineError(f"cannot start or join {where}: {describe(error)}{AUTH_HINT}") from None
    return True


def local_address() -> str:
    """The Ray running on this machine that ray.init() would join ("" when none): RAY_ADDRESS, else the
    address ``ray start`` recorded. EngineError when RAY_ADDRESS cannot be reached; a recorded address
    that cannot be reached is stale (its cluster died without ``ray stop``) and ignored."""
    named = os.environ.get("RAY_ADDRESS", "").strip()
    if named:
        if not reachable(named):
            raise EngineError(f"cannot reach the Ray cluster at {named} (from RAY_ADDRESS)")
        return named
    try:
        from ray._private.utils import read_ray_address  # where `ray start` records its address

        recorded = read_ray_address() or ""
    except Exception:  # a private helper of Ray: without it, start a local Ray
        return ""
    if recorded and not reachable(recorded):
        log.warning(
            "ignoring the stale Ray address %s recorded by `ray start`; starting a local Ray", recorded
        )
        return ""
    return recorded


def reachable(address: str) -> bool:
    """Whether ``address`` ("HOST:PORT", optionally "ray://") accepts a TCP connection within
    CONNECT_TIMEOUT_S; an address of another form is left to Ray (True)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def unfinished(batches: list[list[WorkItem]], done: set[ItemId]) -> list[list[WorkItem]]:
    """The batches, each without its items in ``done``; batches left empty dropped."""
    kept = ([item for item in batch if (item.key, item.file) not in done] for batch in batches)
    return [batch for batch in kept if batch]


# -- the runner -----------------------------------------------------------------------------------


class RayRunner:
    """The :class:`engine.batch.runner.Runner` on Ray (``settings.ray_address``; ``settings.workers``
    actors)."""

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings

    def run(self, batches: Sequence[Sequence[WorkItem]], on_result: ResultCallback) -> None:
        """Render every batch; ``on_result`` once per item, in completion order, on this thread.

        Raises MissingDependencyError without Ray, EngineError when the cluster cannot be reached or a
        worker cannot load the engine. A local Ray started here is shut down when this returns or
        raises; a cluster joined is left running (only this driver disconnects); a Ray this process
        was already connected to is left connected."""
        ray = import_ray()
        todo = [list(batch) for batch in batches if batch]
        if not todo:
            return
        connected = connect(ray, self.settings.ray_address)
        try:
            self._run(ray, todo, on_result)
        finally:
            if connected:
                ray.shutdown()

    def _run(self, ray: ModuleType, batches: list[list[WorkItem]], on_result: ResultCallback) -> None:
        """Up to ``max_tries`` datasets, each over the items still without a result; then errors."""
        done: set[ItemId] = set()
        tries = max(1, self.settings.max_tries)
        failure = "the Ray job ended without their results"
        for _ in range(tries):
            left = unfinished(batches, done)
            if not left:
                return
            error = self._attempt(ray, left, on_result, done)
            if error:
                failure = error
                log.warning("the Ray job failed (%s); running the items without a result again", error)
        for batch in unfinished(batches, done):
            for item in batch:
                on_result(ItemResult(item.key, item.file, error=f"worker crashed {tries} times: {failure}"))

    def _attempt(
        self, ray: ModuleType, batches: list[list[WorkItem]], on_result: ResultCallback, done: set[ItemId]
    ) -> str | None:
        """Run one dataset over ``batches``, reporting each new result; the failure (one line) when the
        dataset did not run to its end, else None. Exceptions of ``on_result`` propagate."""
        expected = {(item.key, item.file) for batch in batches for item in batch}
        rows = iter(self._dataset(ray, batches).iter_rows())  # a generator: closing it stops the dataset
        with closing(rows):
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    return None
                except Exception as error:  # whatever Ray raises for a lost worker or node
                    return describe(error)
                if row["fatal"]:
                    raise EngineError(str(row["fatal"]))
                result = ItemResult.from_json(json.loads(row["result"]))
                ident = (result.key, result.file)
                if ident in expected and ident not in done:  # a retried batch reports once
                    done.add(ident)
                    on_result(result)

    def _dataset(self, ray: ModuleType, batches: list[list[WorkItem]]) -> Any:
        """The lazy Ray Data pipeline: one row per batch, mapped by a pool of RenderActors."""
        nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
        workers = min(self.settings.workers, len(batches))  # an actor without a batch only loads a model
        plan = plan_resources(nodes, ray.cluster_resources().get("GPU", 0.0), workers)
        backend = str(getattr(self.settings.backend, "value", self.settings.backend))  # a BackendName too
        options: dict[str, Any] = (
            {"threads": plan.threads} if plan.threads and backend in THREADED_BACKENDS else {}
        )
        if self.settings.lora_dir is not None:
            options["lora_dir"] = str(Path(self.settings.lora_dir).absolute())
        retries = max(1, self.settings.max_tries) - 1
        rows = [{"batch": json.dumps([item.to_json() for item in batch])} for batch in batches]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings():  # max_restarts / max_task_retries have no named parameter (2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            mapped = dataset.map_batches(
                RenderActor,
                fn_constructor_kwargs={
                    "engine_dir": str(Path(self.settings.engine_dir).absolute()),
                    "backend": backend,
                    "out_dir": str(Path(self.settings.out_dir).absolute()),
                    "options": options,
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=plan.workers),
                num_cpus=plan.num_cpus,
                num_gpus=plan.num_gpus,
                max_restarts=retries,
                max_task_retries=retries,
            )
        mapped.context.enable_progress_bars = False  # this dataset's own copy: the render shows its own
        return mapped
