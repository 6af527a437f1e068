"""benchmarks/gpu.sh, the GPU check: the parts a CPU machine can prove in seconds.

Argument parsing, the wheel-only install into a fresh virtual environment (a real wheel, built here,
installed with no index and no dependencies; the project installed without dependencies), the
results folder and its records, and the skip lines of everything that needs a GPU. The whole dry
run (`bash benchmarks/gpu.sh --dry-run`: every stage on the CPU at the tiny preset) takes minutes
and runs by hand before a GPU slot is spent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
PROBE = "sd_engine_wheel_probe"


def gpu_sh(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SD_ENGINE_GPU_WORK")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


def make_wheel(folder: Path, version: str = "1.2.3") -> Path:
    """A real, minimal pure-Python wheel (PEP 427): a module, METADATA, WHEEL and RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{PROBE}-{version}.dist-info"
    files = {
        f"{PROBE}/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{PROBE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--bogus",), "unknown option --bogus"),
        (("--dry-run", "--stages", "setup,warp"), "unknown stage 'warp'"),
        (("--dry-run", "--deadline", "soon"), "--deadline must be whole seconds"),
        (("--dry-run", "--stages"), "--stages needs a list"),
        (("--dry-run", "a", "b"), "one RESULTS_DIR only"),
        (("--dry-run", "--stages", ""), "--stages needs a list"),
        (("--download-wheels", "--dry-run"), "--download-wheels takes one folder at most"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    done = gpu_sh(*args)
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_help_lists_the_stages() -> None:
    done = gpu_sh("--help")
    assert done.returncode == 0
    for stage in ("setup", "plan", "model", "smoke", "tests", "bench", "--dry-run", "--download-wheels"):
        assert stage in done.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_without_a_gpu_the_real_run_says_so_and_points_at_the_dry_run() -> None:
    done = gpu_sh()
    assert done.returncode == 2
    assert "no NVIDIA GPU" in done.stderr and "--dry-run" in done.stderr


def test_the_wheel_list_pins_what_the_image_lacks() -> None:
    pins = [
        line.split("#")[0].strip()
        for line in (ROOT / "benchmarks" / "gpu-wheels.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert all("==" in pin for pin in pins)
    names = {pin.split("==")[0].lower().replace("_", "-") for pin in pins}
    assert names >= {"diffusers", "importlib-metadata"}


@pytest.fixture(scope="module")
def setup_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """`gpu.sh --dry-run --stages setup,plan` with one real wheel: the install and the plan."""
    base = tmp_path_factory.mktemp("gpu-check")
    wheels, work, results = base / "wheels", base / "work", base / "results"
    make_wheel(wheels)
    stages = ("--dry-run", "--stages", "setup,plan", "--archive", str(base / "results.tar.gz"))
    done = gpu_sh(*stages, "--wheels", str(wheels), "--work", str(work), str(results))
    return done, work, results


def test_the_wheel_installs_into_a_fresh_virtual_environment(setup_run: tuple) -> None:
    done, work, _ = setup_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    python = work / "venv" / "bin" / "python"
    code = f"import {PROBE}, engine; print({PROBE}.__version__, {PROBE}.__file__, engine.__file__)"
    shown = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=work)
    version, probe_file, engine_file = shown.stdout.split()
    venv = (work / "venv").resolve()
    assert version == "1.2.3"
    assert venv in Path(probe_file).resolve().parents  # the wheel, not something outside
    assert venv in Path(engine_file).resolve().parents  # the project, installed without dependencies
    assert "carried wheels (installed with no index, no dependencies)" in done.stdout


def test_the_results_folder_records_the_environment_and_the_stages(setup_run: tuple) -> None:
    done, work, results = setup_run
    assert done.returncode == 0, done.stdout[-3000:]
    env = json.loads((results / "env.json").read_text())
    wheel = f"{PROBE}-1.2.3-py3-none-any.whl"
    assert env["device"] == "cpu" and list(env["wheels"]) == [wheel] and env["wheels"][wheel] > 0
    assert env["packages"]["engine"]["origin"] == "venv"  # the installed copy
    assert (work / "venv" / "bin" / "sd-engine").is_file()  # its console script, in the venv
    stages = (results / "stages.tsv").read_text().splitlines()
    assert stages[0] == "stage\tstatus\tseconds"
    assert [line.split("\t")[:2] for line in stages[1:]] == [["setup", "ok"], ["plan", "ok"]]
    summary = (results / "summary.md").read_text()
    assert "| setup | ok |" in summary and "skipped tensorrt" in summary
    log = (results / "log.txt").read_text()
    assert "== setup: ok" in log and "== plan: ok" in log
    with tarfile.open(results.parent / "results.tar.gz") as archive:  # one file for a slot to hand back
        packed = set(archive.getnames())
    assert {"results/env.json", "results/stages.tsv", "results/summary.md"} <= packed


def test_every_gpu_step_has_a_skip_line(setup_run: tuple) -> None:
    done, _, _ = setup_run
    here, _, gpu = done.stdout.partition("on a GPU: sd-engine bench")
    assert "skip: TensorRT (plans, tests, contender): no CUDA GPU (dry run on the CPU)" in here
    assert "skip: ONNX Runtime CUDA (contender): no CUDA GPU (dry run on the CPU)" in here
    plan = {line.split("] ")[1].split(" (")[0]: line for line in here.splitlines() if line.startswith("  [")}
    for name in ("diffusers", "torch:unfused", "torch:fused", "torch:fused+compile"):
        assert "options" in plan[name], name  # what the dry run runs on the CPU
    for name in (
        "diffusers:fp16",
        "torch-cuda:graph+fused+compile",
        "onnxruntime:graph+fused",
        "tensorrt:graph+fused",
    ):
        assert "would skip: " in plan[name], name  # every GPU contender, with its reason
    # the GPU run's plan, as far as this machine can tell: the same workload and reference as the slot
    assert "--size 512 --steps 50 --runs 3" in gpu and "--psnr-reference cuda-fp32" in gpu
    assert "] tensorrt:graph+fused (" in gpu and "needs tensorrt, which is not installed" in gpu


def test_the_dry_run_refuses_to_prove_the_install_without_wheels(tmp_path: Path) -> None:
    done = gpu_sh(
        "--dry-run", "--stages", "setup", "--wheels", str(tmp_path / "none"), "--work", str(tmp_path / "w"),
        str(tmp_path / "r"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "--download-wheels" in done.stdout
    assert "setup\tfailed (exit 1)" in (tmp_path / "r" / "stages.tsv").read_text()


def summarize(results: Path) -> str:
    script = ROOT / "benchmarks" / "gpu_summary.py"
    return subprocess.run(
        [sys.executable, str(script), str(results)], capture_output=True, text=True, check=True
    ).stdout


def test_the_summary_checks_the_goals_on_a_cuda_report(tmp_path: Path) -> None:
    """A saved CPU report relabelled as the GPU run's (contender names, device, fp32 reference): the
    table, the same-run ratio against the baseline and the goal lines."""
    report = json.loads((ROOT / "benchmarks/results/cpu-2core-sd15-256-2026-11-30-quiet.json").read_text())
    names = {
        "diffusers": "diffusers:fp16",
        "onnxruntime": "torch-cuda:eager+unfused",
        "openvino": "torch-cuda:graph+fused",
    }
    report["contenders"] = {names[k]: v for k, v in report["contenders"].items()}
    report["config"].update(device="cuda", baseline="diffusers:fp16", psnr_reference="cuda-fp32")
    (tmp_path / "bench.json").write_text(json.dumps(report))
    (tmp_path / "stages.tsv").write_text("stage\tstatus\tseconds\nbench\tok\t300\n")
    text = summarize(tmp_path)
    rates = {n: report["contenders"][n]["summary"]["it_per_s"] for n in names.values()}
    ratio = rates["torch-cuda:graph+fused"] / rates["diffusers:fp16"]
    assert f"| torch-cuda:graph+fused | {rates['torch-cuda:graph+fused']:.2f} | {ratio:.2f}x |" in text
    assert f"diffusers fp16 eager it/s: {ratio:.2f}x (met)" in text  # 2.69x in that run
    assert "every image >= 30 dB from fp32: lowest 45.5 dB (torch-cuda:graph+fused) (met)" in text
    assert "stable-fast 104.6" in text and "| bench | ok | 300 |" in text


def test_the_summary_of_stages_that_wrote_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "stages.tsv").write_text("stage\tstatus\tseconds\nsetup\tfailed (exit 1)\t3\n")
    text = summarize(tmp_path)
    assert "| setup | failed (exit 1) | 3 |" in text and "## Benchmark" not in text


def test_results_and_work_folders_are_checked_before_anything_runs(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "bench.json").write_text("{}")  # an earlier run's: never presented as this run's
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, needle in [
        ((str(used),), f"RESULTS_DIR {used} is not empty"),
        ((str(a_file),), f"RESULTS_DIR must be a folder, got the file {a_file}"),
        (("--work", str(a_file), str(tmp_path / "r")), f"--work must be a folder, got the file {a_file}"),
    ]:
        done = gpu_sh("--dry-run", "--stages", "plan", *args)
        assert done.returncode == 2 and needle in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_relative_paths_are_taken_from_where_it_runs(tmp_path: Path) -> None:
    done = gpu_sh("--dry-run", "--stages", "plan", "--work", "w", "results", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "results" / "stages.tsv").is_file() and (tmp_path / "w").is_dir()
    assert not (ROOT / "results").exists()


def test_one_run_at_a_time_per_work_folder(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    with (work / ".lock").open("w") as held:
        import fcntl

        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = gpu_sh("--dry-run", "--stages", "plan", "--work", str(work), str(tmp_path / "r"))
    assert done.returncode == 2 and f"another gpu.sh is using the work folder {work}" in done.stderr


def test_an_interrupted_run_says_so_and_keeps_its_records(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--dry-run", "--wheels", str(wheels), "--work", str(tmp_path / "w"), str(tmp_path / "r")]
    process = subprocess.Popen(
        ["bash", str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert process.stdout is not None
    for line in process.stdout:  # the setup stage is under way: its install takes seconds
        if line.startswith("installing them and sd-engine"):
            process.send_signal(signal.SIGTERM)
            break
    out = process.stdout.read()
    assert process.wait(timeout=60) == 130
    assert "== interrupted during setup" in out
    stages = (tmp_path / "r" / "stages.tsv").read_text().splitlines()
    assert stages[1].split("\t")[:2] == ["setup", "interrupted"]
    assert [line.split("\t")[:2] for line in stages[2:]] == [
        [name, "not run (interrupted during setup)"] for name in ("plan", "model", "smoke", "tests", "bench")
    ]
    assert "| setup | interrupted |" in (tmp_path / "r" / "summary.md").read_text()


def test_kill_9_of_the_script_stops_its_running_command_and_frees_the_work_folder(tmp_path: Path) -> None:
    """The stage command runs under timeout, in its own process group: killing the script's group
    alone must still stop it (parent-death signal) and leave no holder of the lock."""
    import fcntl

    wheels, work = tmp_path / "wheels", tmp_path / "w"
    make_wheel(wheels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [
        "--dry-run",
        "--stages",
        "setup",
        "--wheels",
        str(wheels),
        "--work",
        str(work),
        str(tmp_path / "r"),
    ]
    process = subprocess.Popen(
        ["bash", str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("installing them and sd-engine"):  # pip is running, under timeout
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with (work / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.5)
    else:
        pytest.fail("the work folder's lock is still held 20 s after kill -9")
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True, check=False).stdout
    assert left.strip() == "", f"still running: {left}"
