"""benchmarks/serve_load.py against real `sd-engine serve` processes on the tiny engine (64 px, few steps).

The script starts and stops the servers itself; these tests run it as a user does (its own process)
and read the report it writes: every request answered, the server's counters balanced with the
clients' counts, batch sizes as the batching mode allows, rejections counted as rejections, and
SIGTERM ending each server with exit code 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.benchmarks import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serve_load.py"


def serve_load(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Run the script; its result and, when it wrote one, the JSON report of ``--out``."""
    process = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    json_path = out.parent / f"{out.name}.json" if out else None
    report = json.loads(json_path.read_text()) if json_path and json_path.is_file() else None
    return process, report


def test_batching_on_and_off_balance_with_the_clients(tiny_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "load"
    process, report = serve_load(
        str(tiny_engine), "--clients", "1,3", "--requests-per-client", "2", "--size", "64", "--steps", "2",
        "--batching", "on,off", "--out", str(out),
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert report is not None
    runs = {(r["batching"], r["clients"]): r for r in report["runs"]}
    assert sorted(runs) == [("off", 1), ("off", 3), ("on", 1), ("on", 3)]
    for (batching, clients), run in runs.items():
        assert run["requests"] == run["succeeded"] == run["images"] == 2 * clients
        assert run["rejected"] == run["errors"] == 0
        assert run["problems"] == []
        delta = run["server_delta"]
        assert delta["received"] == delta["succeeded"] == 2 * clients
        assert delta["failed"] == delta["rejected"] == 0
        assert delta["batch_images"] == 2 * clients  # every image went through the batch histogram once
        assert 0 < run["latency_p50_s"] <= run["latency_p99_s"]
        assert run["images_per_min"] > 0
        assert len({(s["client"], s["index"]) for s in run["samples"]}) == 2 * clients
        if batching == "off":
            assert run["mean_batch"] == 1.0
        else:
            assert 1.0 <= run["mean_batch"] <= 4.0
    assert [(s["batching"], s["max_batch"], s["exit_code"]) for s in report["servers"]] == [
        ("on", 4, 0),
        ("off", 1, 0),
    ]
    table = (tmp_path / "load.md").read_text()
    assert table in process.stdout
    assert "| 3 | on |" in table and "x) |" in table  # the on row carries its ratio to off
    assert "MISMATCH" not in table


def test_a_full_queue_shows_as_rejections_and_still_balances(tiny_engine: Path, tmp_path: Path) -> None:
    """Four closed-loop clients against one running and one waiting slot: some requests meet a full
    queue (429 with Retry-After), and the server counts each of them as rejected."""
    out = tmp_path / "rejections"
    process, report = serve_load(
        str(tiny_engine), "--clients", "4", "--requests-per-client", "2", "--size", "64", "--steps", "6",
        "--batching", "off", "--max-queue", "1", "--out", str(out),
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert report is not None
    (run,) = report["runs"]
    assert run["problems"] == []
    assert run["rejected"] >= 1 and run["succeeded"] >= 1
    assert run["rejected"] + run["succeeded"] == run["requests"] == 8
    assert set(run["statuses"]) <= {"200", "429"}
    assert run["server_delta"]["rejected"] == run["rejected"]
    refused = [s for s in run["samples"] if s["status"] == 429]
    assert all(s["retry_after"] and 1 <= int(s["retry_after"]) <= 60 for s in refused)
    assert report["servers"][0]["exit_code"] == 0


@pytest.fixture(scope="module")
def serve_load_module() -> ModuleType:
    """The script as a module, for its argument checks in this process (no server starts)."""
    return load_script(SCRIPT)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--clients", "0"), "--clients: expected numbers >= 1"),
        (("--clients", "1,x"), "--clients: expected whole numbers"),
        (("--batching", "maybe"), "--batching: expected on, off or on,off"),
        (("--requests-per-client", "0"), "must be at least 1"),
        (("--max-queue", "0"), "must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    serve_load_module: ModuleType,
    tiny_engine: Path,
    args: tuple[str, ...],
    needle: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_load_module.main([str(tiny_engine), *args])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err.splitlines()[-1]


def test_a_folder_without_a_manifest_is_refused(
    serve_load_module: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        serve_load_module.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"not an engine folder (no manifest.json): {tmp_path}" in capsys.readouterr().err
