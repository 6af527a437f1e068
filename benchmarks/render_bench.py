"""Throughput of batch rendering on one machine: `sd-engine render` against a plain diffusers loop.

    python benchmarks/render_bench.py ENGINE_DIR --model MODEL_DIR --images 32 --size 256 --steps 8 \
        [--modes one,workers2,ray2,diffusers] [--batching on,off] [--rounds 1] [--out benchmarks/results/NAME]

One jobs file of ``--images`` rows (distinct prompts: the built-in bench prompts cycled with an index;
seeds 1000, 1001, ...; the same size, steps, sampler "Euler a" and CFG 7.5, so they batch) is rendered
by each mode, every (mode, batching) pair as a cold subprocess into a fresh temporary OUT_DIR (deleted
afterwards), so process start, imports and model loads count alike for all:

- ``one``: ``sd-engine render JOBS OUT --engine ENGINE_DIR --workers 1`` (a driver and one worker);
- ``workers2``: the same with ``--workers 2`` (two worker processes, physical cores split between them);
- ``ray2``: ``--ray --workers 2`` (a local Ray the command starts itself, two actors);
- ``diffusers``: ``StableDiffusionPipeline.from_pretrained(MODEL_DIR)`` in fp32 on the CPU with
  ``torch.set_num_threads(physical cores)``: one ``pipe(prompt, ...)`` call per image (batching off)
  or per 4 prompts with a list of generators (batching on), each image saved as a PNG.

Batching on is ``--batch 4``, off ``--batch 1`` (sd-engine modes run with ``--no-review`` unless
``--review``). A run passes when it exits 0 having written exactly ``--images`` PNGs; a failed run is
reported as failed, and the script exits 1. Modes whose libraries are missing (ray; diffusers or torch)
are skipped with the reason printed. With ``--rounds`` above 1 the order of the runs rotates between
rounds, so machine noise hits every mode alike, and each row reports medians over its rounds.

Reported per (mode, batching): wall seconds (subprocess start to exit), images/min over the wall time
and its ratio to the diffusers batching-off row, seconds to the first finished image, and a steady
rate with the same ratio: images finished after the first batch, over the time from the end of the
first batch to the last image (the script watches sd-engine's ledger, results.jsonl, and the diffusers
loop's progress file; this rate leaves out process start and model loads; none when the run is a
single batch). Records the machine and the load average; writes NAME.json (every run, with when each
image finished) and NAME.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.bench.machine import (  # noqa: E402
    load_average,
    machine_info,
    machine_kind,
    package_versions,
    software_info,
)
from engine.bench.prompts import BUILTIN_PROMPTS  # noqa: E402
from engine.bench.writers import write_json_and_table  # noqa: E402

CHILD = "_diffusers_child"  # argv[1] that makes this script the diffusers loop (run as a subprocess)
PROGRESS_NAME = "progress.jsonl"  # the diffusers loop's line per saved PNG (sd-engine: results.jsonl)
LEDGER_NAME = "results.jsonl"
ERRORS_NAME = "errors.jsonl"  # sd-engine's bad rows and failed images, kept in the record of a failed run
BATCH_ON = 4
PARALLEL = 2  # workers of workers2 and ray2
POLL_S = 0.05  # how often a run's progress file is read
STOP_GRACE_S = 15.0  # a run stopped at its timeout (or by Ctrl-C) gets this long after SIGINT
TAIL_CHARS = 2000
SHEET_PREFIX = "contact-sheet"  # sd-engine's review sheets, not rendered images


class Mode(str, Enum):
    ONE = "one"
    WORKERS2 = "workers2"
    RAY2 = "ray2"
    DIFFUSERS = "diffusers"


class Batching(str, Enum):
    ON = "on"
    OFF = "off"

    @property
    def batch(self) -> int:
        return BATCH_ON if self is Batching.ON else 1


@dataclass(frozen=True)
class Workload:
    """What every image asks for; only the prompt and the seed (``seed`` + index) differ."""

    images: int
    size: int
    steps: int
    sampler: str
    cfg: float
    seed: int

    def rows(self) -> list[dict[str, Any]]:
        """The jobs file's rows (GenerationRequest fields), one image each."""
        return [
            {
                "prompt": f"{BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]}, variation {i}",
                "seed": self.seed + i,
                "steps": self.steps,
                "width": self.size,
                "height": self.size,
                "sampler": self.sampler,
                "guidance_scale": self.cfg,
            }
            for i in range(self.images)
        ]


@dataclass(frozen=True)
class Case:
    """One (mode, batching) pair: a row of the report."""

    mode: Mode
    batching: Batching

    @property
    def label(self) -> str:
        return f"{self.mode.value}/{self.batching.value}"


@dataclass(frozen=True)
class Paths:
    """Where a run reads and writes: the engine and model folders, the jobs file, a fresh OUT_DIR and
    the file of the run's stdout and stderr."""

    engine_dir: Path
    model_dir: Path | None
    jobs: Path
    out_dir: Path
    log: Path


def command(case: Case, paths: Paths, review: bool) -> list[str]:
    """The command line of one run (this Python)."""
    if case.mode is Mode.DIFFUSERS:
        assert paths.model_dir is not None  # parse_args requires --model for this mode
        return [sys.executable, str(Path(__file__).resolve()), CHILD, str(paths.model_dir),
                str(paths.jobs), str(paths.out_dir), "--batch", str(case.batching.batch)]  # fmt: skip
    workers = 1 if case.mode is Mode.ONE else PARALLEL
    line = [sys.executable, "-m", "engine.cli", "render", str(paths.jobs), str(paths.out_dir),
            "--engine", str(paths.engine_dir), "--workers", str(workers),
            "--batch", str(case.batching.batch)]  # fmt: skip
    if case.mode is Mode.RAY2:
        line.append("--ray")
    return line if review else [*line, "--no-review"]


def shown(case: Case, review: bool) -> str:
    """The command line of a mode as the report shows it."""
    if case.mode is Mode.DIFFUSERS:
        per_call = "4 prompts" if case.batching is Batching.ON else "1 prompt"
        return f"diffusers fp32 CPU loop, {per_call} per pipe() call"
    workers = 1 if case.mode is Mode.ONE else PARALLEL
    ray = " --ray" if case.mode is Mode.RAY2 else ""
    no_review = "" if review else " --no-review"
    return f"sd-engine render{ray} --workers {workers} --batch {case.batching.batch}{no_review}"


@dataclass(frozen=True)
class Watched:
    """A finished subprocess: exit code (None: killed at the timeout), wall seconds, and when (seconds
    after start) each line of its progress file was first seen."""

    exit_code: int | None
    wall_s: float
    arrivals: tuple[float, ...]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def watch(line: Sequence[str], progress: Path, log: Path, timeout_s: float) -> Watched:
    """Run ``line`` (its own process group; output to ``log``) and time the lines of ``progress`` as
    they appear; the group is killed after ``timeout_s``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    arrivals: list[float] = []
    with log.open("wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            line, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            while True:
                try:
                    code: int | None = process.wait(POLL_S)
                except subprocess.TimeoutExpired:
                    code = None
                now = time.perf_counter() - start
                seen = count_lines(progress)
                arrivals += [now] * (seen - len(arrivals))
                if code is not None:
                    return Watched(code, now, tuple(arrivals))
                if now > timeout_s:
                    stop_group(process)
                    return Watched(None, time.perf_counter() - start, tuple(arrivals))
        finally:  # Ctrl-C here: the run's own process group never sees it
            stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """End a run that is still going, with its process group: SIGINT (sd-engine stops its workers and a
    Ray it started), then SIGKILL after STOP_GRACE_S."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGINT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def rendered_pngs(out_dir: Path) -> int:
    return sum(1 for p in out_dir.glob("*.png") if not p.name.startswith(SHEET_PREFIX))


def tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-TAIL_CHARS:]


def steady_rate(arrivals: Sequence[float], batch: int) -> float | None:
    """Images/min from the end of the first batch (the ``batch``-th image seen) to the last image: the
    rate once the first batch is done, process start and model loads left out (None: one batch only)."""
    if len(arrivals) <= batch:
        return None
    span = arrivals[-1] - arrivals[batch - 1]
    return 60.0 * (len(arrivals) - batch) / span if span > 0 else None


def errors_head(path: Path, lines: int = 5) -> list[str]:
    """The first lines of sd-engine's errors.jsonl (the OUT_DIR is deleted after the run)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[:lines]
    except OSError:
        return []


def summary_line(log: Path) -> str | None:
    """sd-engine render's closing summary ("N images planned: ..."), if it printed one."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return next((line.strip() for line in reversed(lines) if " images planned: " in line), None)


def child_result(log: Path) -> dict[str, Any]:
    """The diffusers loop's closing JSON line (load and loop seconds), or {}."""
    for text in reversed(log.read_text(encoding="utf-8", errors="replace").splitlines()):
        if text.startswith("{"):
            try:
                return dict(json.loads(text))
            except ValueError:
                return {}
    return {}


def run_case(case: Case, paths: Paths, images: int, timeout_s: float, review: bool) -> dict[str, Any]:
    """One cold run of ``case`` into a fresh OUT_DIR: its record (``failed``: None, or why)."""
    progress = paths.out_dir / (PROGRESS_NAME if case.mode is Mode.DIFFUSERS else LEDGER_NAME)
    watched = watch(command(case, paths, review), progress, paths.log, timeout_s)
    written = rendered_pngs(paths.out_dir) if paths.out_dir.is_dir() else 0
    failed = None
    if watched.exit_code is None:
        failed = f"timed out after {timeout_s:g} s"
    elif watched.exit_code != 0:
        failed = f"exit code {watched.exit_code}"
    elif written != images:
        failed = f"wrote {written} PNGs, expected {images}"
    record = {
        "mode": case.mode.value, "batching": case.batching.value, "exit_code": watched.exit_code,
        "failed": failed, "pngs": written, "wall_s": round(watched.wall_s, 3),
        "images_per_min": 60.0 * images / watched.wall_s if not failed else None,
        "first_image_s": round(watched.arrivals[0], 3) if watched.arrivals else None,
        "steady_images_per_min": None if failed else steady_rate(watched.arrivals, case.batching.batch),
        "arrivals_s": [round(t, 3) for t in watched.arrivals],
    }  # fmt: skip
    if case.mode is Mode.DIFFUSERS:
        record["diffusers"] = child_result(paths.log)
    else:
        record["summary"] = summary_line(paths.log)
    if failed:
        record["log_tail"] = tail(paths.log)
        record["errors_head"] = errors_head(paths.out_dir / ERRORS_NAME)
    return record


def say(record: dict[str, Any]) -> None:
    rate = record["images_per_min"]
    state = f"{rate:.2f} images/min" if rate else f"FAILED ({record['failed']})"
    print(
        f"round {record['round']}: {record['mode']}, batching {record['batching']}: {state}, "
        f"wall {record['wall_s']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    if record["failed"]:
        print(record["log_tail"], *record["errors_head"], sep="\n", file=sys.stderr, flush=True)


def run_rounds(args: argparse.Namespace, cases: Sequence[Case], workload: Workload) -> list[dict[str, Any]]:
    """Every case once per round, the order rotated by one each round; every run's record."""
    records = []
    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        jobs = Path(tmp) / "jobs.jsonl"
        jobs.write_text("".join(json.dumps(row) + "\n" for row in workload.rows()), encoding="utf-8")
        for round_ in range(args.rounds):
            shift = round_ % len(cases)
            for position, case in enumerate([*cases[shift:], *cases[:shift]]):
                out_dir = Path(tmp) / f"out-{round_}-{position}"
                paths = Paths(args.engine_dir, args.model, jobs, out_dir, Path(tmp) / f"{out_dir.name}.log")
                record = run_case(case, paths, workload.images, args.timeout, args.review)
                records.append({**record, "round": round_ + 1, "position": position + 1})
                say(records[-1])
                shutil.rmtree(out_dir, ignore_errors=True)
    return records


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def summarize(case: Case, records: Sequence[dict[str, Any]], review: bool) -> dict[str, Any]:
    """A row: medians over the case's successful rounds; ``failed`` lists the failed rounds' reasons."""
    mine = [r for r in records if (r["mode"], r["batching"]) == (case.mode.value, case.batching.value)]
    good = [r for r in mine if not r["failed"]]
    row = {
        "mode": case.mode.value, "batching": case.batching.value, "command": shown(case, review),
        "rounds": len(mine), "failed": [f"round {r['round']}: {r['failed']}" for r in mine if r["failed"]],
        "wall_s": median([r["wall_s"] for r in good]),
        "images_per_min": median([r["images_per_min"] for r in good]),
        "first_image_s": median([r["first_image_s"] for r in good]),
        "steady_images_per_min": median([r["steady_images_per_min"] for r in good]),
    }  # fmt: skip
    if case.mode is Mode.DIFFUSERS:
        row["load_s"] = median([r["diffusers"].get("load_s") for r in good])
        row["loop_s"] = median([r["diffusers"].get("loop_s") for r in good])
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's rates against the diffusers batching-off row (None without one)."""
    base = next((r for r in rows if (r["mode"], r["batching"]) == ("diffusers", "off")), {})
    for row in rows:
        for key in ("images_per_min", "steady_images_per_min"):
            value, reference = row[key], base.get(key)
            row[f"{key}_vs_diffusers_off"] = value / reference if value and reference else None


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def with_ratio(value: float | None, ratio: float | None) -> str:
    return number(value) + (f" ({ratio:.2f}x)" if ratio is not None else "")


def render_markdown(report: dict[str, Any]) -> str:
    """The table: a row per (mode, batching), rates with their ratio to diffusers batching off."""
    s, m = report["settings"], report["machine"]
    lines = [
        f"**Batch rendering, {s['label']} {s['size']}x{s['size']}, {s['steps']} steps {s['sampler']}, "
        f"CFG {s['cfg']:g}, {s['images']} images, {s['rounds']} round(s), medians; {m['cpu']}, "
        f"{m['usable_cores']} cores ({m['physical_cores']} physical), {m['memory_gib']} GiB; "
        f"{report['created']}; load average {report['load_average_start']} -> {report['load_average_end']}**",
        "",
        "| mode | batching | command | wall s | images/min | first image s | steady images/min | status |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['batching']} | {r['command']} | {number(r['wall_s'], 1)} "
            f"| {with_ratio(r['images_per_min'], r['images_per_min_vs_diffusers_off'])} "
            f"| {number(r['first_image_s'], 1)} "
            f"| {with_ratio(r['steady_images_per_min'], r['steady_images_per_min_vs_diffusers_off'])} "
            f"| {'FAILED: ' + '; '.join(r['failed']) if r['failed'] else 'ok'} |"
        )
    lines += [
        "",
        "Every run is a cold subprocess: wall s from its start to its exit, images/min over that time. "
        "(Nx): against diffusers with batching off. First image s: until the first image was finished. "
        "Steady: images finished after the first batch, over the time from the end of the first "
        "batch to the last image (process start and model loads left out).",
    ]
    if not any((r["mode"], r["batching"]) == ("diffusers", "off") for r in report["rows"]):
        lines.append("No diffusers batching-off row in this run: no ratios.")
    for r in report["rows"]:
        if r.get("load_s") is not None:
            lines.append(
                f"diffusers, batching {r['batching']}: imports and from_pretrained {r['load_s']:.1f} s, "
                f"loop {number(r['loop_s'], 1)} s."
            )
    lines += [f"Skipped {s['mode']}: {s['reason']}." for s in report["skipped"]]
    return "\n".join(lines) + "\n"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def choice_list(kind: type[Enum]) -> Any:
    """An argparse type: comma-separated values of ``kind`` (duplicates dropped, order kept)."""
    names = ", ".join(str(m.value) for m in kind)  # type: ignore[attr-defined]

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(dict.fromkeys(kind(item.strip()) for item in text.split(",") if item.strip()))
        except ValueError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"expected some of {names}, separated by commas, got {text!r}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR")
    parser.add_argument(
        "--model", type=Path, metavar="MODEL_DIR", help="the diffusers folder (diffusers mode)"
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=1000, help="the first image's seed (then +1 each)")
    parser.add_argument(
        "--modes", type=choice_list(Mode), default=tuple(Mode), help="one,workers2,ray2,diffusers"
    )
    parser.add_argument("--batching", type=choice_list(Batching), default=tuple(Batching), help="on,off")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--review", action="store_true", help="let sd-engine write its contact sheets and gallery"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take (3600)")
    parser.add_argument("--label", help="the model's name in the report (default: the engine folder's name)")
    parser.add_argument("--out", type=Path, help="NAME: writes NAME.json and NAME.md (default under "
                        "benchmarks/results: MACHINE-render-LABEL-SIZE-DATE)")  # fmt: skip
    args = parser.parse_args(argv)
    if not (args.engine_dir / "manifest.json").is_file():
        parser.error(f"not an engine folder (no manifest.json): {args.engine_dir}")
    if min(args.images, args.size, args.steps, args.rounds) < 1 or args.timeout <= 0:
        parser.error("--images, --size, --steps, --rounds and --timeout must be at least 1")
    if Mode.DIFFUSERS in args.modes and not (args.model and (args.model / "model_index.json").is_file()):
        parser.error("the diffusers mode needs --model MODEL_DIR, a diffusers folder (with model_index.json)")
    return args


def missing_libraries(mode: Mode) -> str | None:
    """Why ``mode`` cannot run here (a library that is not installed), or None."""
    needs = {Mode.RAY2: ("ray",), Mode.DIFFUSERS: ("diffusers", "torch")}.get(mode, ())
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not importable" if missing else None


def default_out(machine: dict[str, Any], label: str, size: int, created: str) -> Path:
    """benchmarks/results/MACHINE-render-LABEL-SIZE-DATE (no suffix)."""
    name = f"{machine_kind(machine, 'cpu')}-render-{label}-{size}-{created[:10]}"
    return ROOT / "benchmarks" / "results" / name


def new_report(args: argparse.Namespace, workload: Workload, label: str) -> dict[str, Any]:
    return {
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "settings": {**asdict(workload), "label": label, "engine_dir": str(args.engine_dir),
                     "model_dir": str(args.model) if args.model else None, "rounds": args.rounds,
                     "modes": [m.value for m in args.modes], "batching": [b.value for b in args.batching],
                     "batch_on": BATCH_ON, "parallel_workers": PARALLEL, "review": args.review},
        "machine": machine_info(),
        "software": {**software_info(), **package_versions(("torch", "diffusers", "transformers", "ray"))},
        "load_average_start": load_average(),
        "skipped": [],
        "runs": [],
        "rows": [],
    }  # fmt: skip


def write_report(report: dict[str, Any], out: Path) -> str:
    """OUT.json (everything) and OUT.md (the table); the table."""
    table = render_markdown(report)
    json_path, md_path = write_json_and_table(report, table, out)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD]:
        return diffusers_child(argv[1:])
    args = parse_args(argv)
    label = args.label or args.engine_dir.resolve().name
    workload = Workload(args.images, args.size, args.steps, args.sampler, args.cfg, args.seed)
    report = new_report(args, workload, label)
    for mode in args.modes:
        if reason := missing_libraries(mode):
            print(f"skipping {mode.value}: {reason}", file=sys.stderr)
            report["skipped"].append({"mode": mode.value, "reason": reason})
    skipped = {s["mode"] for s in report["skipped"]}
    cases = [Case(m, b) for m in args.modes if m.value not in skipped for b in args.batching]
    if not cases:
        print("error: every mode was skipped; nothing to measure", file=sys.stderr)
        return 1
    report["runs"] = run_rounds(args, cases, workload)
    report["rows"] = [summarize(case, report["runs"], args.review) for case in cases]
    add_ratios(report["rows"])
    report["load_average_end"] = load_average()
    print(
        write_report(report, args.out or default_out(report["machine"], label, args.size, report["created"]))
    )
    return 1 if any(row["failed"] for row in report["rows"]) else 0


# -- the diffusers loop (this script run with CHILD as its first argument) ---------------------------


def diffusers_child(argv: Sequence[str]) -> int:
    """Render the jobs file with diffusers' StableDiffusionPipeline (fp32, CPU), ``--batch`` prompts per
    call; a line in OUT_DIR/progress.jsonl after each PNG; prints a JSON line with load_s and loop_s."""
    parser = OneLineParser(prog=f"render_bench.py {CHILD}")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("jobs", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.jobs.read_text(encoding="utf-8").splitlines() if line.strip()]
    start = time.perf_counter()
    pipe = load_diffusers(args.model_dir, str(rows[0]["sampler"]))
    load_s = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (args.out_dir / PROGRESS_NAME).open("a", encoding="utf-8") as progress:
        for first in range(0, len(rows), args.batch):
            for index, image in diffusers_batch(pipe, rows[first : first + args.batch], first):
                name = f"{index:05d}-s{rows[index]['seed']}.png"
                image.save(args.out_dir / name)
                progress.write(json.dumps({"file": name}) + "\n")
                progress.flush()
    loop_s = time.perf_counter() - start
    import torch

    print(
        json.dumps(
            {"load_s": round(load_s, 3), "loop_s": round(loop_s, 3), "threads": torch.get_num_threads()}
        )
    )
    return 0


def load_diffusers(model_dir: Path, sampler: str) -> Any:
    """StableDiffusionPipeline in fp32 on the CPU with the sampler's scheduler, torch on every physical
    core, no safety checker and no progress bar."""
    import diffusers
    import torch

    from engine.machine import physical_cores
    from engine.sampling.registry import lookup

    torch.set_num_threads(physical_cores())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    entry = lookup(sampler)
    scheduler_class = getattr(diffusers, str(entry.diffusers_class))
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **dict(entry.forced))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def diffusers_batch(pipe: Any, rows: Sequence[dict[str, Any]], first: int) -> list[tuple[int, Any]]:
    """One pipe() call for ``rows`` (same settings; a generator per seed): [(row index, PIL image)]."""
    import torch

    r = rows[0]
    generators = [torch.Generator().manual_seed(int(row["seed"])) for row in rows]
    prompts = [str(row["prompt"]) for row in rows]
    with torch.inference_mode():
        out = pipe(
            prompts[0] if len(rows) == 1 else prompts,
            num_inference_steps=int(r["steps"]),
            guidance_scale=float(r["guidance_scale"]),
            width=int(r["width"]),
            height=int(r["height"]),
            generator=generators[0] if len(rows) == 1 else generators,
        )
    return list(enumerate(out.images, start=first))


if __name__ == "__main__":
    sys.exit(main())
