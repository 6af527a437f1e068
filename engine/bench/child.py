"""One contender's process: ``python -m engine.bench.child SPEC.json SPAWN_TIME``.

The parent records ``time.time()`` just before spawning and passes it, so the cold start counts
the interpreter's own start: process start to first image (imports, loading, the first run). The
child writes ``result.json`` (timeline, every sample, peak RSS) and ``first.png`` (the first image
of its first run, for the PSNR against the baseline) into the spec's folder. Its stdout is the
parent's stderr; the parent's stdout carries only the report. A failure is a result too: status
``failed`` and one line of error (an unexpected exception's traceback goes to stderr).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from engine.bench.config import ChildSpec
from engine.bench.machine import load_average
from engine.bench.progress import RunProgress
from engine.errors import EngineError

RESULT_FILE = "result.json"
FIRST_IMAGE = "first.png"


def child_env() -> dict[str, str]:
    """A child process imports the same `engine` package as this process."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def peak_rss_mib() -> float:
    """This process's peak resident set size.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory.
    ``getrusage``'s ru_maxrss would do elsewhere, but on Linux it survives exec and so reports the
    parent's RSS at fork when that is larger (a harness that exported a model first).
    """
    for line in _read_lines(Path("/proc/self/status")):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def measure(spec: ChildSpec, spawn_time: float, entered: float, progress: RunProgress) -> dict[str, Any]:
    """Import, load, then every generation; the first one is the cold run."""
    from engine.bench.contenders import make_runner

    runner = make_runner(spec)
    start = time.perf_counter()
    runner.import_libraries()
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    runner.load()
    load_s = time.perf_counter() - start
    progress.note(f"imports {import_s:.1f} s, load {load_s:.1f} s")
    timeline = {"startup_s": entered - spawn_time, "import_s": import_s, "load_s": load_s}
    samples = []
    for generation in range(spec.generations):
        index = spec.workload.prompt_for(generation, spec.warmup)
        progress.begin(generation)
        start = time.perf_counter()
        image, stages = runner.generate(spec.workload.prompts[index], progress.step)
        latency_ms = (time.perf_counter() - start) * 1000
        if generation == 0:
            timeline["cold_start_s"] = time.time() - spawn_time
            timeline["first_run_s"] = latency_ms / 1000
            save_image(image, spec.out_dir / FIRST_IMAGE)
        progress.end(latency_ms / 1000)
        phase = "warmup" if generation < spec.warmup else "timed"
        samples.append(
            {
                "phase": phase,
                "index": generation,
                "prompt_index": index,
                "latency_ms": latency_ms,
                "stages_ms": stages,
                "load_average": load_average(),  # other work on the machine, for the record
            }
        )
    return {
        "status": "ok",
        "info": runner.info(),
        "timeline": timeline,
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": runner.peak_gpu_mib(),
        "samples": samples,
    }


def save_image(image: Any, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def describe_error(error: BaseException, limit: int = 500) -> str:
    """``"OSError: Unable to load weights ..."``: the type and the message's first ``limit`` characters,
    on one line."""
    message = " ".join(str(error).split())
    message = message if len(message) <= limit else message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def main(argv: list[str]) -> int:
    entered = time.time()
    spec = ChildSpec.from_json(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    spawn_time = float(argv[1])
    progress = RunProgress(spec.contender.name, spec.warmup, spec.runs)
    try:
        result = measure(spec, spawn_time, entered, progress)
    except (EngineError, ValueError) as error:
        result = {"status": "failed", "error": str(error)}
    except Exception as error:  # a library's own failure (a corrupt weights file, ...): its traceback
        traceback.print_exc()  # goes to the log, its type and message into the result
        result = {"status": "failed", "error": describe_error(error)}
    (spec.out_dir / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
