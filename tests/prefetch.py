"""Fixtures that export engines, built ahead in a second process while the tests before them run.

CI runs the tests in one pytest process on 2 cores, and exporting a tiny engine is mostly
single-threaded Python (dynamo tracing, onnxscript's optimizer): about a minute each. When collection
ends, one background process (at nice 10, so it takes the core the tests leave idle rather than time
from them) builds, one after another, the engines in :data:`BUILDERS` that the collected tests use,
in the order the tests first need them. Their fixture then finds the folder ready (the first user
comes minutes later in a full run) or waits for it; without a background job it builds inline. Either
way the same builder writes the same files. ``SD_ENGINE_TEST_PREFETCH=0`` builds everything inline.

A builder is a module-level function ``build(folder: Path) -> None`` that writes all it needs (its
model folders too) into an empty ``folder``. Its exceptions reach the fixture as a failure that quotes
the background's traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = "SD_ENGINE_TEST_PREFETCH"
NICE = 10
POLL_S = 0.2
LOG_TAIL = 4000  # characters of the background's log quoted when it died

# fixture name -> "module:function" that builds its folder
BUILDERS = {
    "tiny_v_engine": "tests.conftest:build_tiny_v_engine",
    "sd1_export": "tests.pipeline.test_model_sources:build_sd1_export",
    "tiny_xl_engine": "tests.conftest:build_tiny_xl_engine",
}


@dataclass(frozen=True)
class Job:
    """One fixture's folder: the builder writes ``build/``, then ``done`` or ``failed`` (a traceback)."""

    fixture: str
    root: Path

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def failed(self) -> Path:
        return self.root / "failed"


@dataclass(frozen=True)
class Prefetch:
    """The background process and its jobs, by fixture name."""

    process: subprocess.Popen[bytes]
    jobs: dict[str, Job]
    log: Path

    def wait(self, fixture: str) -> Path:
        """The job's build folder once built; pytest.fail with the reason when it was not."""
        job = self.jobs[fixture]
        while not job.done.exists():
            if job.failed.exists():
                pytest.fail(f"{fixture} (built in the background):\n{job.failed.read_text()}", pytrace=False)
            if self.process.poll() is not None and not job.done.exists():
                tail = self.log.read_text(errors="replace")[-LOG_TAIL:]
                pytest.fail(
                    f"{fixture}: the background build process exited ({self.process.returncode}) before "
                    f"building it; the end of {self.log}:\n{tail}",
                    pytrace=False,
                )
            time.sleep(POLL_S)
        return job.build


PREFETCH = pytest.StashKey[Prefetch]()


def builder(fixture: str) -> Callable[[Path], None]:
    module, function = BUILDERS[fixture].split(":")
    return getattr(importlib.import_module(module), function)


def start(session: pytest.Session) -> None:
    """Start the background builds the collected tests need (pytest_collection_finish)."""
    config = session.config
    if os.environ.get(ENV, "1") == "0" or config.option.collectonly or PREFETCH in config.stash:
        return
    needed: list[str] = []  # in the order the tests first use them
    for item in session.items:
        needed += [n for n in getattr(item, "fixturenames", ()) if n in BUILDERS and n not in needed]
    if not needed:
        return
    base = config._tmp_path_factory.mktemp("prefetch")  # what the tmp_path_factory fixture hands out
    jobs = {name: Job(name, base / name) for name in needed}
    log = base / "log.txt"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.prefetch", json.dumps({n: str(j.root) for n, j in jobs.items()})],
            cwd=config.rootpath,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    config.stash[PREFETCH] = Prefetch(process, jobs, log)


def stop(config: pytest.Config) -> None:
    """End the background process if it still runs (pytest_sessionfinish): the session is over."""
    prefetch = config.stash.get(PREFETCH, None)
    if prefetch is None or prefetch.process.poll() is not None:
        return
    prefetch.process.terminate()
    try:
        prefetch.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        prefetch.process.kill()
        prefetch.process.wait()


def prefetched(request: pytest.FixtureRequest) -> Path:
    """The requesting fixture's folder: from the background when it has the job, else built here."""
    prefetch = request.config.stash.get(PREFETCH, None)
    if prefetch is not None and request.fixturename in prefetch.jobs:
        return prefetch.wait(request.fixturename)
    folder = request.getfixturevalue("tmp_path_factory").mktemp(request.fixturename)
    builder(request.fixturename)(folder)
    return folder


def main(jobs: dict[str, str]) -> None:
    """The background process: build each job in turn; a failure is recorded and the next one built.
    Stops between jobs once pytest is gone (killed before it could end this process)."""
    os.nice(NICE)
    parent = os.getppid()
    for fixture, root in jobs.items():
        if os.getppid() != parent:
            return
        job = Job(fixture, Path(root))
        job.build.mkdir(parents=True)
        started = time.perf_counter()
        try:
            builder(fixture)(job.build)
        except Exception:
            job.failed.write_text(traceback.format_exc())
        else:
            job.done.touch()
        print(f"prefetch: {fixture} in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
