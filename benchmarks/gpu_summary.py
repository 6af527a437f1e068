"""The GPU check's summary (benchmarks/gpu.sh, last step): stages, skip lines, the benchmark table and
the issue's goals, as markdown on stdout.

    python benchmarks/gpu_summary.py RESULTS_DIR > RESULTS_DIR/summary.md

Reads RESULTS_DIR/stages.tsv, env.json and bench.json (each optional: a stage that did not run leaves
its part out). Figures come from the bench report's summaries (medians over the timed runs):
it/s = steps / denoising time; host ms/step = the time per step outside the networks; first-run
overhead = first run - warm median (compilation, CUDA-graph capture, autotuning).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

# stable-fast's published SD 1.5 512 px it/s on an H100 (its README): the anchors the issue names.
STABLE_FAST_H100 = {"stable-fast": 104.6, "torch.compile": 66.0, "torch": 54.5}
GRAPH_GOAL = 1.3  # torch-cuda with CUDA graphs against diffusers fp16 eager, it/s, same run
PSNR_GOAL_DB = 30.0


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def wheel_list(wheels: dict[str, int]) -> str:
    return ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in wheels.items()) or "none"


def stage_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.open(encoding="utf-8"), delimiter="\t"))
    lines = ["| stage | status | seconds |", "|---|---|---:|"]
    return lines + [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in rows]


def number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def bench_row(name: str, entry: dict[str, Any], baseline_it_s: float | None) -> str:
    summary = entry.get("summary") or {}
    if entry.get("status") != "ok" or not summary:
        return f"| {name} | {entry.get('status')}: {entry.get('error', '')} |" + " |" * 9
    overhead = summary["first_run_s"] - summary["latency_ms"]["p50"] / 1000
    compile_s = summary.get("compile_s") or (entry.get("info") or {}).get("compile_s")
    psnr = (entry.get("agreement") or {}).get("psnr_db")
    ratio = summary["it_per_s"] / baseline_it_s if baseline_it_s else None
    cells = [
        name,
        number(summary["it_per_s"]),
        f"{number(ratio)}x" if ratio else "-",
        number(summary["s_per_image"], 3),
        number(summary.get("unet_device_per_step_ms")),
        number(summary["stages_ms"].get("host_per_step")),
        number(summary.get("peak_gpu_mib"), 0),
        number(summary["load_s"], 1),
        f"{number(overhead, 1)}" + (f" (compile {number(compile_s, 1)})" if compile_s else ""),
        "identical" if psnr is None and "agreement" in entry else number(psnr, 1),
    ]
    return "| " + " | ".join(cells) + " |"


def bench_lines(report: dict[str, Any]) -> list[str]:
    config = report["config"]
    w = config["workload"]
    contenders = report["contenders"]
    baseline = contenders.get(config["baseline"], {}).get("summary") or {}
    base_it_s = baseline.get("it_per_s")
    lines = [
        f"{w['width']}x{w['height']}, {w['steps']} steps {w['sampler']}, CFG {w['guidance_scale']}, "
        f"batch {w['batch_size']}, {config['runs']} timed runs after {config['warmup']} warm-up; "
        f"device {config['device']}; PSNR against {config['psnr_reference']}; baseline {config['baseline']}.",
        "",
        "| contender | it/s | vs baseline | s/image | UNet device ms/step | host ms/step | peak GPU MiB "
        "| load s | first-run overhead s | PSNR dB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [bench_row(name, entry, base_it_s) for name, entry in contenders.items()]
    fp32 = config["psnr_reference"] in ("cpu-fp32", "cuda-fp32")
    return [
        *lines,
        "",
        *notes(report),
        *goal_lines(contenders, base_it_s, config["device"], fp32, bool(report.get("partial"))),
    ]


def notes(report: dict[str, Any]) -> list[str]:
    """What to keep in mind reading the table: a dry run measures nothing, the machine's load, and
    what the device column means for an eager contender."""
    load = report.get("load_average") or {}
    lines = [f"- load average at start / end: {load.get('start')} / {load.get('end')}"]
    if report["config"]["device"] == "cpu":
        lines.insert(0, "- dry run on the CPU: the figures show the stages ran, they measure nothing")
    else:
        lines.append(
            "- UNet device ms/step: CUDA events around each UNet call; for diffusers (eager, nothing "
            "waits in its loop) that span includes any time the GPU waits for kernel launches"
        )
    return lines


def goal_lines(
    contenders: dict[str, Any], base_it_s: float | None, device: str, fp32_reference: bool, partial: bool
) -> list[str]:
    """The issue's goals, checked where the contenders ran (PSNR only against an fp32 reference)."""
    lines = []
    graph = contenders.get("torch-cuda:graph+fused", {}).get("summary")
    if graph and base_it_s:
        ratio = graph["it_per_s"] / base_it_s
        verdict = "met" if ratio >= GRAPH_GOAL else "not met"
        lines.append(
            f"- goal: torch-cuda with CUDA graphs >= {GRAPH_GOAL}x diffusers fp16 eager it/s: "
            f"{ratio:.2f}x ({verdict})"
        )
    psnrs = [
        (name, (entry.get("agreement") or {}).get("psnr_db"))
        for name, entry in contenders.items()
        if entry.get("status") == "ok" and "agreement" in entry
    ]
    scope = "; a partial run: only the contenders that ran" if partial else ""
    if psnrs and fp32_reference:
        worst = min(psnrs, key=lambda item: float("inf") if item[1] is None else item[1])
        ok = all(p is None or p >= PSNR_GOAL_DB for _, p in psnrs)
        lowest = "all identical" if worst[1] is None else f"lowest {worst[1]:.1f} dB ({worst[0]})"
        lines.append(
            f"- goal: every image >= {PSNR_GOAL_DB:.0f} dB from fp32: {lowest} "
            f"({'met' if ok else 'not met'}{scope})"
        )
    rates = [(e["summary"]["it_per_s"], n) for n, e in contenders.items() if e.get("summary")]
    if rates and device == "cuda":
        best = max(rates)
        anchors = ", ".join(f"{k} {v}" for k, v in STABLE_FAST_H100.items())
        lines.append(
            f"- fastest here: {best[1]} at {best[0]:.1f} it/s; stable-fast's published H100 figures "
            f"(it/s): {anchors}"
        )
    return lines


def main(results: Path) -> int:
    env = read_json(results / "env.json")
    report = read_json(results / "bench.json") or read_json(results / "bench.partial.json")
    out = [f"# sd-engine GPU check: {results.name}", ""]
    if env:
        gpu = env.get("gpu") or {}
        versions = {k: (v or {}).get("version") for k, v in env.get("packages", {}).items()}
        out.append(
            f"Python {env.get('python')}, device {env.get('device')}, GPU {gpu.get('name', 'none')}; "
            f"torch {versions.get('torch')} (CUDA {gpu.get('torch_cuda')}), diffusers "
            f"{versions.get('diffusers')}, transformers {versions.get('transformers')}, cuda-bindings "
            f"{versions.get('cuda.bindings')}; carried wheels: {wheel_list(env.get('wheels') or {})}."
        )
        out += [""] + [f"- skipped {k}: {v}" for k, v in (env.get("skipped") or {}).items() if v]
        out.append("")
    out += stage_lines(results / "stages.tsv")
    if report:
        out += ["", "## Benchmark", ""]
        if report.get("partial"):
            not_run = ", ".join(report.get("not_run") or []) or "none"
            out += [f"PARTIAL: the bench stage stopped before it finished; not run: {not_run}.", ""]
        out += bench_lines(report)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_summary.py RESULTS_DIR")
    sys.exit(main(Path(sys.argv[1])))
