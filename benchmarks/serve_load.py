"""Load on `sd-engine serve`: concurrent A1111 txt2img clients, with dynamic batching on and off.

    python benchmarks/serve_load.py ENGINE_DIR --clients 1,4,16 --requests-per-client 4 --size 256 \
        --steps 8 [--batching on,off] [--out benchmarks/results/NAME]

For each batching mode the real server runs as a subprocess on a free port of 127.0.0.1 (on:
``--max-batch 4 --batch-window-ms 50``; off: ``--max-batch 1 --batch-window-ms 0``; ``--max-queue`` the
largest client count unless given, so nothing is refused unless asked). After /health/ready and one
warm-up request, each client count runs that many concurrent clients (asyncio, one httpx.AsyncClient),
each sending its requests one after another: different prompts and seeds, the same size, steps, sampler
and CFG, so the server may batch them. Both modes run in one invocation, so machine noise hits both.

Reported per (batching, clients): images/min over the wall time of the run, p50 and p99 latency of the
answered requests, rejections (429/503), errors (any other status, or no answer), and the mean UNet
batch from the ``sd_engine_batch_images`` histogram. /metrics is read before and after each run: the
server's counters must balance (received == succeeded + failed + rejected) and their deltas must equal
what the clients saw. The server is stopped with SIGTERM and must exit 0. Writes NAME.json (every
latency) and NAME.md (the table, also printed); exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine.bench.machine import load_average, machine_info, machine_kind, software_info  # noqa: E402
from engine.bench.prompts import BUILTIN_PROMPTS  # noqa: E402
from engine.bench.writers import write_json_and_table  # noqa: E402

API = "a1111_txt2img"  # the server's label for /sdapi/v1/txt2img in its request counters
ROUTE = "/sdapi/v1/txt2img"
REJECTED = frozenset({429, 503})
READY_TIMEOUT_S = 600.0  # an sd15 engine folder loads in seconds; a cold disk takes longer
METRICS_SETTLE_S = 2.0  # the server counts a request right after its answer is sent
NEGATIVE = "blurry, low quality"


class Batching(str, Enum):
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class ServerMode:
    """How one server runs: its batching and queue options."""

    batching: Batching
    max_batch: int
    batch_window_ms: float
    max_queue: int
    extra: tuple[str, ...]

    def arguments(self, engine_dir: Path, port: int) -> list[str]:
        return [
            sys.executable, "-m", "engine.cli", "serve", str(engine_dir), "--port", str(port),
            "--max-batch", str(self.max_batch), "--batch-window-ms", f"{self.batch_window_ms:g}",
            "--max-queue", str(self.max_queue), *self.extra,
        ]  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """What every request asks for (only prompt and seed differ between requests)."""

    size: int
    steps: int
    sampler: str
    cfg: float
    seed: int

    def payload(self, run: int, client: int, index: int) -> dict[str, Any]:
        """Request ``index`` of ``client`` in ``run`` (0: the warm-up): a prompt and seed of its own, so no
        cache (the pipeline keeps prompt embeddings) answers it from an earlier request."""
        prompt = BUILTIN_PROMPTS[(client + index) % len(BUILTIN_PROMPTS)]
        return {
            "prompt": f"{prompt}, variation {run}.{client}.{index}",
            "negative_prompt": NEGATIVE,
            "seed": self.seed + 1_000_000 * run + 1000 * client + index,
            "steps": self.steps,
            "width": self.size,
            "height": self.size,
            "sampler_name": self.sampler,
            "cfg_scale": self.cfg,
            "batch_size": 1,
            "n_iter": 1,
        }


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it: status (None: no answer), seconds, images returned, the start
    of an error body (or the transport error) and the Retry-After header of a refusal."""

    client: int
    index: int
    status: int | None
    latency_s: float
    images: int
    detail: str = ""
    retry_after: str | None = None


@dataclass(frozen=True)
class ServerCounts:
    """The generation counters for ``API`` and the batch histogram at one moment (from /metrics)."""

    received: float
    succeeded: float
    failed: float
    rejected: float
    batches: float
    batch_images: float

    def minus(self, before: ServerCounts) -> ServerCounts:
        mine, theirs = asdict(self), asdict(before)
        return ServerCounts(**{key: mine[key] - theirs[key] for key in mine})


def is_request_counter(name: str) -> bool:
    return name.startswith("sd_engine_requests_") and name.endswith("_total")


def parse_metrics(text: str) -> ServerCounts:
    """The counters of ``API`` from a Prometheus text body (families missing so far count 0)."""
    values: dict[str, float] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sd_engine_batch_images_count":
                values["batches"] += sample.value
            elif sample.name == "sd_engine_batch_images_sum":
                values["batch_images"] += sample.value
            elif is_request_counter(sample.name) and sample.labels.get("api") == API:
                values[sample.name.removeprefix("sd_engine_requests_").removesuffix("_total")] += sample.value
    return ServerCounts(**{key: float(values[key]) for key in ServerCounts.__dataclass_fields__})


async def server_counts(http: httpx.AsyncClient) -> ServerCounts:
    response = await http.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(mode: ServerMode, engine_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            mode.arguments(engine_dir, port), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )


async def wait_ready(http: httpx.AsyncClient, process: subprocess.Popen[bytes], log: Path) -> float:
    """Seconds until /health/ready answers 200; RuntimeError with the server's log when it exits first."""
    start = time.perf_counter()
    while time.perf_counter() - start < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {process.returncode} before it was ready:\n{tail(log)}"
            )
        try:
            if (await http.get("/health/ready")).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the server was not ready after {READY_TIMEOUT_S:g} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def stop_server(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """SIGTERM (the server drains, then exits); its exit code, or None when it had to be killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


async def request(http: httpx.AsyncClient, workload: Workload, run: int, client: int, index: int) -> Outcome:
    start = time.perf_counter()
    try:
        response = await http.post(ROUTE, json=workload.payload(run, client, index))
    except httpx.HTTPError as error:
        seconds = time.perf_counter() - start
        return Outcome(client, index, None, seconds, 0, f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        retry_after = response.headers.get("retry-after")
        return Outcome(client, index, response.status_code, seconds, 0, response.text[:200], retry_after)
    images = len(response.json().get("images", ()))
    return Outcome(client, index, 200, seconds, images)


async def client_loop(
    http: httpx.AsyncClient, workload: Workload, run: int, client: int, count: int
) -> list[Outcome]:
    return [await request(http, workload, run, client, index) for index in range(count)]


async def run_clients(
    http: httpx.AsyncClient, workload: Workload, run: int, clients: int, per_client: int
) -> tuple[list[Outcome], float]:
    """``clients`` concurrent closed-loop clients; every outcome and the run's wall time (s)."""
    start = time.perf_counter()
    per_client_outcomes = await asyncio.gather(
        *(client_loop(http, workload, run, client, per_client) for client in range(clients))
    )
    return [o for outcomes in per_client_outcomes for o in outcomes], time.perf_counter() - start


def balance_problems(outcomes: Sequence[Outcome], delta: ServerCounts, total: ServerCounts) -> list[str]:
    """What does not add up between the server's counters and the clients' outcomes (empty: all do)."""
    statuses = Counter(o.status for o in outcomes)
    rejected = sum(n for status, n in statuses.items() if status is not None and 400 <= status < 500)
    seen = {
        "received": len(outcomes),
        "succeeded": statuses[200],
        "rejected": rejected,
        "failed": len(outcomes) - statuses[200] - rejected,
    }
    problems = [
        f"{name}: clients saw {count}, the server counted {getattr(delta, name):g}"
        for name, count in seen.items()
        if getattr(delta, name) != count
    ]
    for counts, what in ((delta, "this run"), (total, "since start")):
        if counts.received != counts.succeeded + counts.failed + counts.rejected:
            problems.append(
                f"{what}: received {counts.received:g} != succeeded {counts.succeeded:g} + failed "
                f"{counts.failed:g} + rejected {counts.rejected:g}"
            )
    if statuses[200] and delta.batch_images < statuses[200]:
        problems.append(f"{statuses[200]} answered images but {delta.batch_images:g} in the batch histogram")
    return problems


async def settled_counts(http: httpx.AsyncClient, before: ServerCounts, sent: int) -> ServerCounts:
    """/metrics once the server has counted all ``sent`` requests (it counts each right after answering),
    or as it stands after METRICS_SETTLE_S."""
    deadline = time.perf_counter() + METRICS_SETTLE_S
    while True:
        after = await server_counts(http)
        if after.received - before.received >= sent or time.perf_counter() > deadline:
            return after
        await asyncio.sleep(0.05)


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(
    mode: ServerMode,
    clients: int,
    outcomes: Sequence[Outcome],
    wall_s: float,
    delta: ServerCounts,
    total: ServerCounts,
) -> dict[str, Any]:
    """One row of the report: rates, latency percentiles (answered requests), counts and checks."""
    ok = [o.latency_s for o in outcomes if o.status == 200]
    statuses = Counter("none" if o.status is None else str(o.status) for o in outcomes)
    images = sum(o.images for o in outcomes)
    rejected = sum(1 for o in outcomes if o.status in REJECTED)
    return {
        "batching": mode.batching.value,
        "clients": clients,
        "requests": len(outcomes),
        "succeeded": len(ok),
        "rejected": rejected,
        "errors": len(outcomes) - len(ok) - rejected,
        "statuses": dict(sorted(statuses.items())),
        "images": images,
        "wall_s": round(wall_s, 3),
        "images_per_min": images / wall_s * 60 if wall_s > 0 else 0.0,
        "latency_p50_s": percentile(ok, 50),
        "latency_p99_s": percentile(ok, 99),
        "mean_batch": delta.batch_images / delta.batches if delta.batches else None,
        "server_delta": asdict(delta),
        "problems": balance_problems(outcomes, delta, total),
        "samples": [asdict(o) for o in outcomes],
    }


@dataclass(frozen=True)
class Plan:
    """What one server gets: the workload, the client counts in order, requests per client, and how long
    a client waits for an answer and the server for its drain (s)."""

    workload: Workload
    clients: tuple[int, ...]
    per_client: int
    timeout_s: float
    drain_timeout_s: float


async def measure_runs(http: httpx.AsyncClient, plan: Plan, mode: ServerMode) -> list[dict[str, Any]]:
    """One run per client count on a ready, warmed-up server, /metrics read around each."""
    runs = []
    for run, count in enumerate(plan.clients, start=1):
        before = await server_counts(http)
        outcomes, wall_s = await run_clients(http, plan.workload, run, count, plan.per_client)
        after = await settled_counts(http, before, len(outcomes))
        runs.append(summarize(mode, count, outcomes, wall_s, after.minus(before), after))
        say(runs[-1])
    return runs


async def measure_mode(mode: ServerMode, engine_dir: Path, plan: Plan) -> dict[str, Any]:
    """Start the server, wait for /health/ready, warm it up, run every client count, stop it with SIGTERM:
    the mode's part of the report. RuntimeError (with the server's log) when it fails to start."""
    port = free_port()
    connections = max(plan.clients) + 4
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(plan.timeout_s, connect=30.0)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        log = Path(tmp) / "server.log"
        process = start_server(mode, engine_dir, port, log)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=timeout
            ) as http:
                ready_s = await wait_ready(http, process, log)
                warm = await request(http, plan.workload, 0, 0, 0)
                if warm.status != 200:
                    raise RuntimeError(
                        f"the warm-up request failed ({warm.status}): {warm.detail}\n{tail(log)}"
                    )
                runs = await measure_runs(http, plan, mode)
        finally:
            stop_start = time.perf_counter()
            exit_code = stop_server(process, plan.drain_timeout_s + 30)
            stop_s = time.perf_counter() - stop_start
        server = {
            **asdict(mode), "batching": mode.batching.value, "port": port, "ready_s": round(ready_s, 2),
            "warmup_s": round(warm.latency_s, 3), "exit_code": exit_code, "stop_s": round(stop_s, 2),
            "log_tail": tail(log),
        }  # fmt: skip
    return {"server": server, "runs": runs}


def say(run: dict[str, Any]) -> None:
    state = "balanced" if not run["problems"] else "; ".join(run["problems"])
    print(
        f"batching {run['batching']}, {run['clients']} clients: {run['images_per_min']:.2f} images/min, "
        f"p50 {seconds(run['latency_p50_s'])}, {run['rejected']} rejected, {run['errors']} errors, "
        f"mean batch {run['mean_batch'] or 0:.2f}; metrics {state}",
        file=sys.stderr,
        flush=True,
    )


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def ratio(value: float | None, baseline: float | None, faster_is_smaller: bool) -> str:
    if not value or not baseline:
        return ""
    return f" ({baseline / value if faster_is_smaller else value / baseline:.2f}x)"


def render_markdown(report: dict[str, Any]) -> str:
    """The table: a row per (clients, batching), ratios of batching on against off at the same count."""
    s, m = report["settings"], report["machine"]
    runs = report["runs"]
    off = {r["clients"]: r for r in runs if r["batching"] == Batching.OFF.value}
    lines = [
        f"**sd-engine serve, {s['label']} {s['size']}x{s['size']}, {s['steps']} steps {s['sampler']}, "
        f"CFG {s['cfg']:g}; {s['requests_per_client']} A1111 txt2img requests per client after 1 warm-up; "
        f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; {report['created']}; "
        f"load average {report['load_average_start']} -> {report['load_average_end']}**",
        "",
        "| clients | batching | images/min | p50 latency | p99 latency | answered | rejected | errors "
        "| mean batch | metrics |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["clients"], r["batching"] != Batching.OFF.value)):
        base = off.get(r["clients"]) if r["batching"] != Batching.OFF.value else None
        base = base or {}
        lines.append(
            f"| {r['clients']} | {r['batching']} "
            f"| {r['images_per_min']:.2f}{ratio(r['images_per_min'], base.get('images_per_min'), False)} "
            f"| {seconds(r['latency_p50_s'])}{ratio(r['latency_p50_s'], base.get('latency_p50_s'), True)} "
            f"| {seconds(r['latency_p99_s'])}{ratio(r['latency_p99_s'], base.get('latency_p99_s'), True)} "
            f"| {r['succeeded']}/{r['requests']} | {r['rejected']} | {r['errors']} "
            f"| {'-' if r['mean_batch'] is None else format(r['mean_batch'], '.2f')} "
            f"| {'balanced' if not r['problems'] else 'MISMATCH'} |"
        )
    lines += ["", "(Nx): batching on against off at the same client count: speedup for rates and times."]
    for mode in report["servers"]:
        lines.append(
            f"Batching {mode['batching']}: `--max-batch {mode['max_batch']} --batch-window-ms "
            f"{mode['batch_window_ms']:g} --max-queue {mode['max_queue']}`, ready in {mode['ready_s']} s, "
            f"SIGTERM exit code {mode['exit_code']}."
        )
    problems = [f"- {r['batching']}, {r['clients']} clients: {p}" for r in runs for p in r["problems"]]
    return "\n".join(lines + (["", "Metric mismatches:", *problems] if problems else [])) + "\n"


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1 separated by commas, got {text!r}")
    return values


def batching_list(text: str) -> tuple[Batching, ...]:
    try:
        return tuple(Batching(item.strip()) for item in text.split(",") if item.strip()) or (Batching.ON,)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected on, off or on,off, got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--clients", type=int_list, default=(1, 4, 16), help="client counts (1,4,16)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--batching", type=batching_list, default=(Batching.ON, Batching.OFF), help="on,off")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-batch", type=int, default=4, help="the server's --max-batch with batching on (4)"
    )
    parser.add_argument("--batch-window-ms", type=float, default=50.0, help="with batching on (50)")
    parser.add_argument(
        "--max-queue", type=int, help="the server's queue (default: the largest client count)"
    )
    parser.add_argument("--server-args", default="", help="more `sd-engine serve` options, one string")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM may take (60)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a client waits per request")
    parser.add_argument("--label", help="the model's name in the report (default: the engine folder's name)")
    parser.add_argument("--out", type=Path, help="NAME: writes NAME.json and NAME.md (default under "
                        "benchmarks/results: MACHINE-serve-LABEL-SIZE-DATE)")  # fmt: skip
    args = parser.parse_args(argv)
    if not (args.engine_dir / "manifest.json").is_file():
        parser.error(f"not an engine folder (no manifest.json): {args.engine_dir}")
    if (
        args.requests_per_client < 1
        or args.max_batch < 1
        or (args.max_queue is not None and args.max_queue < 1)
    ):
        parser.error("--requests-per-client, --max-batch and --max-queue must be at least 1")
    return args


def server_modes(args: argparse.Namespace) -> list[ServerMode]:
    queue = args.max_queue or max(args.clients)
    extra = (*shlex.split(args.server_args), "--drain-timeout", f"{args.drain_timeout:g}")
    settings = {Batching.ON: (args.max_batch, args.batch_window_ms), Batching.OFF: (1, 0.0)}
    return [ServerMode(b, *settings[b], queue, extra) for b in dict.fromkeys(args.batching)]


def default_out(machine: dict[str, Any], label: str, size: int, created: str) -> Path:
    """benchmarks/results/MACHINE-serve-LABEL-SIZE-DATE (no suffix), as the bench harness names its files."""
    return (
        ROOT
        / "benchmarks"
        / "results"
        / f"{machine_kind(machine, 'cpu')}-serve-{label}-{size}-{created[:10]}"
    )


def new_report(args: argparse.Namespace, workload: Workload, label: str) -> dict[str, Any]:
    return {
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "settings": {**asdict(workload), "label": label, "engine_dir": str(args.engine_dir),
                     "clients": list(args.clients), "requests_per_client": args.requests_per_client},
        "machine": machine_info(),
        "software": software_info(),
        "load_average_start": load_average(),
        "servers": [],
        "runs": [],
    }  # fmt: skip


def write_report(report: dict[str, Any], out: Path) -> str:
    """OUT.json (everything) and OUT.md (the table); the table."""
    table = render_markdown(report)
    json_path, md_path = write_json_and_table(report, table, out)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    label = args.label or args.engine_dir.resolve().name
    workload = Workload(args.size, args.steps, args.sampler, args.cfg, args.seed)
    plan = Plan(workload, args.clients, args.requests_per_client, args.timeout, args.drain_timeout)
    report = new_report(args, workload, label)
    for mode in server_modes(args):
        try:
            part = asyncio.run(measure_mode(mode, args.engine_dir, plan))
        except RuntimeError as error:
            print(f"error: batching {mode.batching.value}: {error}", file=sys.stderr)
            return 1
        report["servers"].append(part["server"])
        report["runs"] += part["runs"]
    report["load_average_end"] = load_average()
    print(
        write_report(report, args.out or default_out(report["machine"], label, args.size, report["created"]))
    )
    failed = [r for r in report["runs"] if r["problems"] or r["errors"]]
    bad_exit = [s for s in report["servers"] if s["exit_code"] != 0]
    return 1 if failed or bad_exit else 0


if __name__ == "__main__":
    sys.exit(main())
