"""benchmarks/render_bench.py on the tiny engine and its diffusers folder (64 px, 2 steps, 4 images).

The script runs as a user runs it (its own process, which starts each mode as a cold subprocess) and
the tests read the report it writes. The ray2 mode is left out here: `sd-engine render --ray` has its
own tests (tests/batch), and starting Ray costs more CI time than this whole file.
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
SCRIPT = ROOT / "benchmarks" / "render_bench.py"
TINY = ("--images", "4", "--size", "64", "--steps", "2", "--rounds", "1")


def render_bench(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Run the script; its result and, when it wrote one, the JSON report of ``--out``."""
    process = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    out = Path(args[args.index("--out") + 1])
    json_path = out.parent / f"{out.name}.json"
    return process, json.loads(json_path.read_text()) if json_path.is_file() else None


def test_sd_engine_batching_on_and_off(tiny_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "render"
    process, report = render_bench(
        str(tiny_engine), *TINY, "--modes", "one", "--batching", "on,off", "--out", str(out)
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert report is not None
    rows = {(r["mode"], r["batching"]): r for r in report["rows"]}
    assert list(rows) == [("one", "on"), ("one", "off")]
    for row in rows.values():
        assert row["failed"] == [] and row["rounds"] == 1
        assert row["images_per_min"] > 0 and 0 < row["first_image_s"] <= row["wall_s"]
    assert rows["one", "on"]["steady_images_per_min"] is None  # 4 images are one batch of 4
    assert rows["one", "off"]["steady_images_per_min"] > 0  # 3 images after the first
    assert rows["one", "on"]["command"] == "sd-engine render --workers 1 --batch 4 --no-review"
    for run in report["runs"]:
        assert run["pngs"] == 4 and run["exit_code"] == 0 and len(run["arrivals_s"]) == 4
        assert run["summary"].startswith("4 images planned: 4 rendered")
    assert report["machine"]["physical_cores"] >= 1 and report["load_average_end"] is not None
    table = (tmp_path / "render.md").read_text()
    assert table in process.stdout
    assert "| one | on | sd-engine render --workers 1 --batch 4 --no-review |" in table
    assert "FAILED" not in table


@pytest.mark.slow  # two cold diffusers processes: 16 s of CI time; the sd-engine modes run above
def test_sd_engine_and_diffusers_side_by_side(tiny_engine: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "render"
    process, report = render_bench(
        str(tiny_engine), "--model", str(tiny_model), *TINY, "--modes", "one,diffusers",
        "--batching", "on,off", "--out", str(out),
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert report is not None
    rows = {(r["mode"], r["batching"]): r for r in report["rows"]}
    assert list(rows) == [("one", "on"), ("one", "off"), ("diffusers", "on"), ("diffusers", "off")]
    for row in rows.values():
        assert row["failed"] == [] and row["rounds"] == 1
        assert row["images_per_min"] > 0 and row["wall_s"] > 0
        assert 0 < row["first_image_s"] <= row["wall_s"]
        assert row["images_per_min_vs_diffusers_off"] > 0
    assert rows["diffusers", "off"]["images_per_min_vs_diffusers_off"] == 1.0
    assert rows["diffusers", "on"]["load_s"] > 0
    assert rows["one", "on"]["steady_images_per_min"] is None  # 4 images are one batch of 4
    assert rows["one", "off"]["steady_images_per_min"] > 0  # 3 images after the first
    assert rows["one", "on"]["command"] == "sd-engine render --workers 1 --batch 4 --no-review"
    for run in report["runs"]:
        assert run["pngs"] == 4 and run["exit_code"] == 0 and len(run["arrivals_s"]) == 4
    sd_engine = [run for run in report["runs"] if run["mode"] == "one"]
    assert all(run["summary"].startswith("4 images planned: 4 rendered") for run in sd_engine)
    assert report["machine"]["physical_cores"] >= 1 and report["load_average_end"] is not None
    table = (tmp_path / "render.md").read_text()
    assert table in process.stdout
    assert "| one | on | sd-engine render --workers 1 --batch 4 --no-review |" in table
    assert "| diffusers | off | diffusers fp32 CPU loop, 1 prompt per pipe() call |" in table
    assert "(1.00x)" in table and "FAILED" not in table


def test_a_failed_mode_is_a_failed_row_and_exit_1(tiny_engine: Path, tmp_path: Path) -> None:
    """Rows with an unknown sampler: `sd-engine render` exits 1 and writes no PNG; the script goes on."""
    out = tmp_path / "failed"
    process, report = render_bench(
        str(tiny_engine), *TINY, "--modes", "one", "--batching", "off", "--sampler", "nope", "--out", str(out)
    )
    assert process.returncode == 1, process.stderr[-3000:]
    assert report is not None
    (row,) = report["rows"]
    assert row["failed"] == ["round 1: exit code 1"]
    assert row["images_per_min"] is None
    (run,) = report["runs"]
    assert "4 bad rows" in run["log_tail"] and run["pngs"] == 0
    assert len(run["errors_head"]) == 4 and all("nope" in line for line in run["errors_head"])
    assert "| one | off |" in process.stdout and "FAILED: round 1: exit code 1" in process.stdout


@pytest.fixture(scope="module")
def render_bench_module() -> ModuleType:
    """The script as a module, for its argument checks in this process (nothing is rendered)."""
    return load_script(SCRIPT)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--modes", "nope"), "--modes: expected some of one, workers2, ray2, diffusers"),
        (("--batching", "maybe"), "--batching: expected some of on, off"),
        (("--images", "0"), "must be at least 1"),
        (("--modes", "diffusers"), "the diffusers mode needs --model MODEL_DIR"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    render_bench_module: ModuleType,
    tiny_engine: Path,
    args: tuple[str, ...],
    needle: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if needle is None:
        assert render_bench_module.parse_args([str(tiny_engine), *args]).modes == (
            render_bench_module.Mode.ONE,
        )
        return
    with pytest.raises(SystemExit) as exit_info:
        render_bench_module.main([str(tiny_engine), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err


def test_a_folder_without_a_manifest_is_refused(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--modes", "one"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert process.returncode == 2
    assert process.stderr.splitlines() == [
        f"render_bench.py: error: not an engine folder (no manifest.json): {tmp_path} (--help for usage)"
    ]
