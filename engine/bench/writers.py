"""Report files: JSON (everything), CSV (one row per sample), markdown (the table), PNG chart, and the
partial JSON a run keeps up to date while it goes on (NAME.partial.json, removed when it completes).

The chart needs matplotlib, an optional extra (``pip install "sd-engine[bench]"``); the rest only
the standard library.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.bench.report import render_markdown
from engine.bench.stats import derived

CSV_STAGES = ("text_encoder", "prepare", "unet_total", "unet_per_step", "scheduler_per_step", "vae_decode")
CSV_COLUMNS = (
    "contender", "phase", "index", "prompt_index", "latency_ms",
    *(f"{s}_ms" for s in CSV_STAGES), "host_per_step_ms", "unet_calls", "load_average_1m",
)  # fmt: skip
# Chart segments: (label, how to get milliseconds from a summary).
CHART_SEGMENTS = (
    ("text encoder", lambda s: s["stages_ms"]["text_encoder"]),
    ("UNet", lambda s: s["stages_ms"]["unet_total"]),
    ("host (scheduler, ...)", lambda s: s["latency_ms"]["p50"] - _networks(s)),
    ("VAE decode", lambda s: s["stages_ms"]["vae_decode"]),
)
CHART_HINT = 'the chart needs matplotlib: pip install "sd-engine[bench]" (or pip install matplotlib)'


def _networks(summary: Mapping[str, Any]) -> float:
    stages = summary["stages_ms"]
    return stages["text_encoder"] + stages["unet_total"] + stages["vae_decode"]


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_json_and_table(report: Mapping[str, Any], table: str, out: Path) -> tuple[Path, Path]:
    """OUT.json (the whole report) and OUT.md (its table), for the scripts in benchmarks/."""
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path = out.parent / f"{out.name}.md"
    md_path.write_text(table, encoding="utf-8")
    return write_json(report, out.parent / f"{out.name}.json"), md_path


def write_partial(report: Mapping[str, Any], path: Path) -> Path:
    """The report so far as JSON, written atomically (``engine.fsutil.write_atomic``): a run killed
    while writing it leaves the previous version whole, never half a file."""
    from engine.fsutil import write_atomic

    return write_atomic(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in report["contenders"].items():
        for sample in entry.get("samples", ()):
            stages = sample["stages_ms"]
            row = {k: sample[k] for k in ("phase", "index", "prompt_index", "latency_ms")}
            row.update({f"{s}_ms": stages.get(s, "") for s in CSV_STAGES})
            row["host_per_step_ms"] = derived(sample)["host_per_step"]
            row["unet_calls"] = int(stages["unet_calls"])
            row["load_average_1m"] = (sample.get("load_average") or [""])[0]
            rows.append({"contender": name, **row})
    return rows


def write_csv(report: Mapping[str, Any], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(report))
    return path


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    path.write_text(render_markdown(report), encoding="utf-8")
    return path


def check_chart_support() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(CHART_HINT)


def write_chart(report: Mapping[str, Any], path: Path) -> Path:
    """Horizontal stacked bars: each contender's p50 latency split into its stages."""
    check_chart_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(e["label"], e["summary"]) for e in report["contenders"].values() if e.get("summary")]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(entries)))
    left = [0.0] * len(entries)
    for label, get in CHART_SEGMENTS:
        widths = [max(get(s), 0.0) / 1000 for _, s in entries]
        ax.barh([name for name, _ in entries], widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds per run (p50)")
    w = report["config"]["workload"]
    ax.set_title(
        f"{report['config']['model']} {w['width']}x{w['height']}, {w['steps']} steps, batch {w['batch_size']}"
    )
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
