"""`sd-engine render` end to end on the tiny engine: real worker processes, real PNGs, the real ledger.

Every image is compared pixel for pixel with ``Pipeline.generate`` of the same settings and seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.batch.ledger import SEEDS_NAME
from engine.batch.local import LocalRunner, worker_main
from engine.batch.render import RenderJob, render
from engine.batch.runner import RenderSettings
from engine.infotext import PNG_KEY, parse_infotext
from engine.pipeline import Pipeline
from tests.batch.helpers import IMAGES, ROWS, SIZE, errors, ledger, pixels, pngs, run_render, write_jobs


@pytest.fixture(scope="module")
def pipe(tiny_engine: Path) -> Pipeline:
    return Pipeline.load(tiny_engine)


def reference(pipe: Pipeline, row: dict[str, Any], seed: int) -> np.ndarray:
    settings = {k: v for k, v in row.items() if k not in ("prompt", "negative_prompt", "n", "seed")}
    result = pipe.generate(row["prompt"], row.get("negative_prompt", ""), seed=seed, **settings)
    return np.asarray(result.images[0])


def check_images(out: Path, rows: list[dict[str, Any]], pipe: Pipeline) -> None:
    """Exactly one PNG per image of ``rows``, each equal to Pipeline.generate, with its infotext."""
    entries = ledger(out)
    files = {entry["file"]: entry for entry in entries}
    assert len(files) == len(entries), "a file appears twice in the ledger"
    expected = []
    for row in rows:
        for i in range(row.get("n", 1)):
            seed = row["seed"] + i
            name = next(
                f for f in files if f.endswith(f"-s{seed}.png") and files[f]["row"] == files_row(row, rows)
            )
            expected.append(name)
            np.testing.assert_array_equal(pixels(out / name), reference(pipe, row, seed), err_msg=name)
            with Image.open(out / name) as image:
                info = parse_infotext(image.text[PNG_KEY])
            assert info["Prompt"] == row["prompt"] and int(info["Seed"]) == seed
    assert sorted(expected) == pngs(out)


def files_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    return f"{rows.index(row):05d}"


def test_render_writes_every_image_equal_to_generate(
    tmp_path: Path, tiny_engine: Path, pipe: Pipeline
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS)
    out = tmp_path / "out"
    assert run_render(jobs, out, tiny_engine, "--batch", "4") == 0
    check_images(out, ROWS, pipe)
    assert errors(out) == []
    assert (out / "index.html").is_file() and (out / "contact-sheet.png").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_skips_and_an_edit_renders_only_what_changed(
    tmp_path: Path, tiny_engine: Path, pipe: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS)
    out = tmp_path / "out"
    assert run_render(jobs, out, tiny_engine) == 0
    stamps = {name: (out / name).stat().st_mtime_ns for name in pngs(out)}
    capsys.readouterr()
    assert run_render(jobs, out, tiny_engine) == 0
    assert "0 rendered" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in pngs(out)} == stamps
    edited = [dict(row) for row in ROWS]
    edited[1]["prompt"] = "a yellow sphere"  # two images change; the rest stay
    write_jobs(jobs, edited)
    assert run_render(jobs, out, tiny_engine) == 0
    assert "2 rendered" in capsys.readouterr().out
    kept = [name for name in pngs(out) if "blue" not in name]
    for name in kept:
        if name in stamps:
            assert (out / name).stat().st_mtime_ns == stamps[name]
    assert len(ledger(out)) == IMAGES + 2


def test_bad_rows_go_to_errors_and_the_rest_renders(
    tmp_path: Path, tiny_engine: Path, pipe: Pipeline
) -> None:
    rows: list[Any] = [
        ROWS[0],
        "{not json",
        {"prompt": "x", "sampler": "Nope", **SIZE},
        {"prompt": "y", **SIZE, "width": 60},
        ROWS[2],
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    assert run_render(jobs, out, tiny_engine) == 1
    assert [e["line"] for e in errors(out)] == [2, 3, 4]
    assert len(pngs(out)) == 2
    fail_fast = tmp_path / "ff"
    assert run_render(jobs, fail_fast, tiny_engine, "--fail-fast") == 1
    assert pngs(fail_fast) == []


def test_random_seeds_are_stored_and_reused(tmp_path: Path, tiny_engine: Path, pipe: Pipeline) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a cat", "seed": -1, "n": 4, **SIZE}])
    out = tmp_path / "out"
    assert run_render(jobs, out, tiny_engine) == 0
    first = pngs(out)
    seeds = sorted(int(name.rsplit("-s", 1)[1][:-4]) for name in first)
    assert seeds == list(range(seeds[0], seeds[0] + 4))
    assert json.loads((out / SEEDS_NAME).read_text())
    (out / first[0]).unlink()  # resume redraws nothing: the same seeds, the one missing image
    assert run_render(jobs, out, tiny_engine) == 0
    assert pngs(out) == first
    np.testing.assert_array_equal(
        pixels(out / first[0]), reference(pipe, {"prompt": "a cat", **SIZE}, seeds[0])
    )


def test_two_workers_write_the_same_files(tmp_path: Path, tiny_engine: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_render(jobs, one, tiny_engine, "--batch", "1") == 0
    assert run_render(jobs, two, tiny_engine, "--workers", "2", "--batch", "2") == 0
    assert pngs(one) == pngs(two)
    for name in pngs(one):
        np.testing.assert_array_equal(pixels(one / name), pixels(two / name), err_msg=name)


def test_a_second_render_into_the_same_folder_is_refused(tmp_path: Path, tiny_engine: Path) -> None:
    from engine.batch.ledger import render_lock
    from engine.errors import EngineError

    out = tmp_path / "out"
    out.mkdir()
    with render_lock(out), pytest.raises(EngineError, match="another sd-engine render"):
        render(RenderJob(write_jobs(tmp_path / "j.jsonl", ROWS[:1]), RenderSettings(tiny_engine, out)))


# -- crashes ------------------------------------------------------------------------------------


def crash_on_blue(connection: Any, settings: RenderSettings, threads: int | None) -> None:
    """A real worker that dies (os._exit, as a segfault would end it) on any batch holding 'blue'."""
    from multiprocessing.connection import Connection

    class Tripwire:
        def __init__(self, inner: Connection) -> None:
            self.inner = inner

        def recv(self) -> Any:
            message = self.inner.recv()
            if message and any("blue" in item["request"] for item in message):
                os._exit(9)
            return message

        def send(self, value: Any) -> None:
            self.inner.send(value)

    worker_main(Tripwire(connection), settings, threads)  # type: ignore[arg-type]


class CrashingRunner(LocalRunner):
    worker_target = staticmethod(crash_on_blue)


def test_a_worker_that_keeps_dying_gives_up_and_the_rest_renders(
    tmp_path: Path, tiny_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.batch.render as render_module

    monkeypatch.setattr(render_module, "make_runner", CrashingRunner)
    out = tmp_path / "out"
    job = RenderJob(write_jobs(tmp_path / "jobs.jsonl", ROWS), RenderSettings(tiny_engine, out, max_tries=2))
    summary = render(job)
    assert (summary.rendered, summary.failed) == (IMAGES - 2, 2)
    assert {e["row"] for e in errors(out)} == {"00001"} and "died 2 times" in errors(out)[0]["error"]
    assert len(pngs(out)) == IMAGES - 2


def test_kill_9_at_random_points_then_resume(
    tmp_path: Path, tiny_engine: Path, pipe: Pipeline, rng: np.random.Generator
) -> None:
    rows = [{"prompt": f"prompt {i}", "seed": 100 + i, "n": 2, **SIZE, "steps": 4} for i in range(8)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "render",
        str(jobs),
        str(out),
        "--engine",
        str(tiny_engine),
    ]
    for delay in rng.uniform(0.5, 6.0, size=4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(delay))
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".render.lock"]
    check_images(out, rows, pipe)


def test_dry_run_counts_and_writes_nothing(
    tmp_path: Path, tiny_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS[:1])
    out = tmp_path / "out"
    assert run_render(jobs, tmp_path / "none", tiny_engine, "--dry-run") == 0
    assert not (tmp_path / "none").exists()
    assert run_render(jobs, out, tiny_engine) == 0
    write_jobs(jobs, [*ROWS, ROWS[0] | {"id": "again"}, "{bad"])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    assert run_render(jobs, out, tiny_engine, "--dry-run") == 1
    captured = capsys.readouterr()
    assert "6 images planned: 4 to render, 1 already done, 1 to copy, 1 bad rows" in captured.out
    assert "line 6:" in captured.err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
