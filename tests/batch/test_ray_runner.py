"""The Ray runner on a real local Ray (2 CPUs, 2 actors) with the tiny engine: every item gets exactly
one result, the PNGs equal Pipeline.generate's, bad items come back as errors while the rest render, a
killed actor's batch is retried, and a batch that keeps killing its worker gives up after max_tries."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.batch.items import (
    EngineIdentity,
    WorkItem,
    canonical_json,
    file_name,
    item_key,
    row_label,
)
from engine.batch.ray_runner import RayRunner, plan_resources, reachable
from engine.batch.runner import RenderSettings
from engine.batch.worker import KEY_CHUNK, ItemResult
from engine.errors import EngineError
from engine.manifest import read_manifest
from engine.pipeline import GenerationRequest, Pipeline

FAST = {"steps": 2, "width": 64, "height": 64}
SLOW = {"steps": 20, "width": 256, "height": 256}  # ~1 s on one core: a kill lands while it renders
BUSY_TITLE = "ray::MapWorker(MapBatches(RenderActor)).submit"  # an actor's process title while rendering


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray of this test process (2 CPUs), shared by the module; runners join it."""
    ray = pytest.importorskip("ray")
    context = ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def identity(tiny_engine: Path) -> EngineIdentity:
    return EngineIdentity.of(read_manifest(tiny_engine), "onnxruntime")


def make_item(identity: EngineIdentity, index: int, prompt: str, seed: int, **settings: int) -> WorkItem:
    """A one-image item as the render driver makes it."""
    request = canonical_json(GenerationRequest.create(prompt, seed=seed, **{**FAST, **settings}).to_json())
    label = row_label(index, None)
    name = file_name(label, 0, prompt, seed)
    return WorkItem(item_key(identity, request), name, label, index + 1, 0, request)


def render(settings: RenderSettings, batches: list[list[WorkItem]]) -> dict[tuple[str, str], ItemResult]:
    """Run the runner; every item must get exactly one result."""
    results: list[ItemResult] = []
    RayRunner(settings).run(batches, results.append)
    counts = Counter((result.key, result.file) for result in results)
    assert counts == Counter((item.key, item.file) for batch in batches for item in batch)
    return {(result.key, result.file): result for result in results}


def result_of(results: dict[tuple[str, str], ItemResult], item: WorkItem) -> ItemResult:
    return results[(item.key, item.file)]


class ActorKiller(threading.Thread):
    """SIGKILLs the RenderActor processes of this test's Ray (descendants of this process) while they
    render a batch, at most ``limit`` times: a worker lost for real, with no hook in the product code."""

    def __init__(self, limit: int) -> None:
        super().__init__(daemon=True)
        self.limit = limit
        self.killed: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.killed) < self.limit:
            for pid in busy_actors():
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                break
            time.sleep(0.01)

    def __enter__(self) -> ActorKiller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def busy_actors() -> list[int]:
    """Pids of this process's descendants whose title says they are rendering a batch."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title == BUSY_TITLE and descends_from_us(int(entry.name)):
                found.append(int(entry.name))
    return found


def descends_from_us(pid: int) -> bool:
    for _ in range(8):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after the state: the parent's pid
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
    return False


# -- tests ------------------------------------------------------------------------------------------


def test_ray_renders_every_item_like_generate_and_retries_a_killed_actor(
    tiny_engine: Path, identity: EngineIdentity, ray_address: str, tmp_path: Path
) -> None:
    """One run for several checks (each Ray run costs seconds of actor start-up): results, pixels,
    infotext, bad items as errors while the rest render, and a batch whose actor is killed mid-render
    rendered again by a restarted actor."""
    prompts = [f"a red fox {index}" for index in range(4)] + ["a slow owl"]
    good = [make_item(identity, index, prompt, 40 + index) for index, prompt in enumerate(prompts[:4])]
    slow = make_item(identity, 4, prompts[4], 44, **SLOW)
    bad_size = make_item(identity, 5, "a bad size", 1, width=68)  # the engine needs multiples of 8
    text = "{not json"
    garbled = WorkItem(item_key(identity, text), "00006-000-garbled-s1.png", "00006", 7, 0, text)
    batches = [[slow], [good[0], good[1]], [good[2], bad_size], [garbled, good[3]]]
    settings = RenderSettings(tiny_engine, tmp_path, workers=2, ray_address=ray_address, max_tries=2)

    with ActorKiller(limit=1) as killer:
        results = render(settings, batches)

    assert len(killer.killed) == 1
    assert "multiple of 8" in (result_of(results, bad_size).error or "")
    assert "not valid JSON" in (result_of(results, garbled).error or "")
    pipe = Pipeline.load(tiny_engine)
    for index, item in enumerate([*good, slow]):
        result = result_of(results, item)
        assert result.ok, result.error
        data = (tmp_path / item.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == result.sha256
        expected = pipe.generate(prompts[index], seed=40 + index, **(SLOW if item is slow else FAST))
        with Image.open(tmp_path / item.file) as image:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(expected.images[0]))
            assert image.info["parameters"] == expected.infotext(0)
            assert image.info[KEY_CHUNK] == item.key
    # no PNG for the bad items; a hidden temp file may remain where the kill hit a write (the resume sweeps)
    shown = sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith("."))
    assert shown == sorted(item.file for item in [*good, slow])


def test_ray_gives_up_on_a_batch_that_keeps_killing_its_worker(
    tiny_engine: Path, identity: EngineIdentity, ray_address: str, tmp_path: Path
) -> None:
    doomed = make_item(identity, 0, "a doomed owl", 3, **SLOW)
    tries = 2
    settings = RenderSettings(tiny_engine, tmp_path, workers=2, ray_address=ray_address, max_tries=tries)

    start = time.monotonic()
    with ActorKiller(limit=100) as killer:
        results = render(settings, [[doomed]])

    error = result_of(results, doomed).error or ""
    assert error.startswith(f"worker crashed {tries} times: ActorDiedError"), error
    assert tries <= len(killer.killed) <= tries**2  # Ray's retries within a dataset, datasets in all
    assert time.monotonic() - start < 120


def test_ray_worker_that_cannot_load_the_engine_is_one_error(ray_address: str, tmp_path: Path) -> None:
    item = WorkItem("k", "00000-000-x-s1.png", "00000", 1, 0, '{"prompt": ["x"]}')
    settings = RenderSettings(tmp_path / "no-engine", tmp_path, workers=1, ray_address=ray_address)
    with pytest.raises(EngineError, match=r"cannot load .*no-engine") as caught:
        RayRunner(settings).run([[item]], lambda result: None)
    assert "\n" not in str(caught.value)


def test_engine_batch_imports_without_ray_and_asks_for_the_extra() -> None:
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from pathlib import Path\n"
        "from engine.batch.ray_runner import RayRunner\n"
        "from engine.batch.runner import RenderSettings\n"
        "from engine.errors import MissingDependencyError\n"
        "try:\n"
        "    RayRunner(RenderSettings(Path('e'), Path('o'), ray_address='')).run([[]], print)\n"
        "except MissingDependencyError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 'pip install -e ".[ray]"' in done.stdout


def test_reachable_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert reachable(f"127.0.0.1:{port}")
        assert reachable(f"ray://127.0.0.1:{port}")
    assert not reachable(f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("nodes", "gpus", "workers", "expected"),
    [
        ([2.0], 0.0, 2, (2, 1.0, None, 1)),
        ([8.0], 0.0, 3, (3, 2.0, None, 2)),  # 2 each: three fit on 8 CPUs, 3 each would not
        ([8.0, 8.0], 0.0, 3, (3, 4.0, None, 4)),  # an actor lives on one node: 5 each fits only 2
        ([2.0], 0.0, 4, (4, 0.5, None, 1)),  # Ray takes fractions of one CPU only
        ([1.0, 1.0], 0.0, 3, (3, 0.5, None, 1)),
        ([16.0], 2.0, 4, (2, None, 1.0, None)),  # one GPU each, as many actors as GPUs
    ],
)
def test_actor_resources_fit_the_cluster(
    nodes: list[float], gpus: float, workers: int, expected: tuple[object, ...]
) -> None:
    plan = plan_resources(nodes, gpus, workers)
    assert (plan.workers, plan.num_cpus, plan.num_gpus, plan.threads) == expected


def test_render_on_ray_writes_the_same_files_as_worker_processes_and_resumes(
    ray_address: str, tiny_engine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.batch.helpers import ROWS, ledger, pixels, pngs, run_render, write_jobs

    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert run_render(jobs, local, tiny_engine) == 0
    assert run_render(jobs, on_ray, tiny_engine, "--ray", ray_address, "--workers", "2", "--batch", "2") == 0
    assert pngs(on_ray) == pngs(local)
    for name in pngs(local):
        np.testing.assert_array_equal(pixels(on_ray / name), pixels(local / name), err_msg=name)
    assert sorted(e["file"] for e in ledger(on_ray)) == pngs(local)
    capsys.readouterr()
    assert run_render(jobs, on_ray, tiny_engine, "--ray", ray_address, "--workers", "2") == 0
    assert " 0 rendered" in capsys.readouterr().out
