"""The report as text: a terminal table (per stage, Module | Latency, then the pipeline, in the
manner of TensorRT's diffusion demo), the same table in markdown, and a summary over several runs.

Each non-baseline cell carries its ratio to the baseline in parentheses: a speedup for times and
rates (above 1 is better), the RSS ratio for memory (below 1 is less).

A partial report (``"partial": true``, written while a run goes on and left behind when it is killed)
says so above the table, and its contenders that did not run show "not run"; a failed fp32 PSNR
reference (``config.psnr_reference_error``) leaves the PSNR row empty and its reason above the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = tuple[str, list[str]]
MISSING = "-"
GPU_ROW = "peak GPU memory"
COMPILE_ROW = "UNet torch.compile (first call)"
# Rows shown only when some contender has a value (GPU runs, compiled contenders).
OPTIONAL_ROWS = (GPU_ROW, "UNet device time, per step", "loop - UNet device, per step", COMPILE_ROW)


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return MISSING
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def fmt_s(seconds: float | None) -> str:
    return MISSING if seconds is None else f"{seconds:.1f} s"


def fmt_duration(seconds: float | None) -> str:
    """Seconds shown as fmt_ms shows milliseconds: sub-second times keep their digits."""
    return MISSING if seconds is None else fmt_ms(seconds * 1000)


def fmt_mib(mib: float | None) -> str:
    if mib is None:
        return MISSING
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def fmt_psnr(agreement: Mapping[str, Any] | None) -> str:
    if not agreement:
        return MISSING
    psnr = agreement["psnr_db"]
    return "identical" if psnr is None else f"{psnr:.1f} dB"


def _with_ratio(text: str, ratio: float | None) -> str:
    return text if ratio is None or text == MISSING else f"{text} ({ratio:.2f}x)"


def describe_run(report: Mapping[str, Any]) -> str:
    """One line: the model, workload and machine."""
    c, m = report["config"], report["machine"]
    w = c["workload"]
    return (
        f"{c['model']} {w['width']}x{w['height']}, {w['steps']} steps {w['sampler']}, "
        f"CFG {w['guidance_scale']}, "
        f"batch {w['batch_size']}; {c['runs']} timed runs after {c['warmup']} warm-up; "
        f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; {report['created']}"
    )


def notes(report: Mapping[str, Any]) -> list[str]:
    """Lines to read before the table: the report is partial (and which contenders did not run), the
    PSNR reference run failed (and why)."""
    out = []
    if report.get("partial"):
        not_run = report.get("not_run") or []
        if not_run:
            out.append(
                "PARTIAL REPORT: the benchmark stopped before it finished; not run: " + ", ".join(not_run)
            )
        else:
            out.append("PARTIAL REPORT: every contender ran, the benchmark stopped before its final files")
    error = report["config"].get("psnr_reference_error")
    if error:
        out.append(f"PSNR column empty: {error}")
    return out


def _stage_rows(entries: list[Mapping[str, Any]]) -> list[Row]:
    def stage(name: str, ratio: str | None = None) -> list[str]:
        cells = []
        for e in entries:
            s = e.get("summary")
            text = fmt_ms(s["stages_ms"][name]) if s else MISSING
            cells.append(_with_ratio(text, _ratio(e, ratio)) if ratio else text)
        return cells

    def device(name: str) -> list[str]:
        return [fmt_ms(e["summary"].get(name)) if e.get("summary") else MISSING for e in entries]

    return [
        ("CLIP text encoder", stage("text_encoder", "text_encoder")),
        ("UNet, per step", stage("unet_per_step", "unet_per_step")),
        ("UNet device time, per step", device("unet_device_per_step_ms")),
        ("scheduler, per step", stage("scheduler_per_step")),
        ("host overhead, per step", stage("host_per_step")),
        ("loop - UNet device, per step", device("gap_per_step_ms")),
        ("VAE decoder", stage("vae_decode", "vae_decode")),
    ]


def _ratio(entry: Mapping[str, Any], name: str | None) -> float | None:
    ratios = entry.get("ratios")
    if not ratios or name is None or entry.get("is_baseline"):
        return None
    return ratios["memory_ratio"] if name == "memory" else ratios["speedup"].get(name)


def _pipeline_rows(entries: list[Mapping[str, Any]], batch: int) -> list[Row]:
    def cell(get: Callable[[Mapping[str, Any]], str], ratio: str | None = None) -> list[str]:
        out = []
        for e in entries:
            s = e.get("summary")
            out.append(_with_ratio(get(s), _ratio(e, ratio)) if s else e.get("error_cell", MISSING))
        return out

    return [
        ("Pipeline latency, p50", cell(lambda s: fmt_ms(s["latency_ms"]["p50"]), "latency_p50")),
        (
            "p90 / min / max",
            cell(lambda s: " / ".join(fmt_ms(s["latency_ms"][k]) for k in ("p90", "min", "max"))),
        ),
        ("it/s", cell(lambda s: f"{s['it_per_s']:.3f}", "it_per_s")),
        (f"images/s (batch {batch})", cell(lambda s: f"{s['images_per_s']:.4f}", "images_per_s")),
        ("s/image", cell(lambda s: fmt_s(s["latency_ms"]["p50"] / 1000 / batch))),
        ("load", cell(lambda s: fmt_s(s["load_s"]), "load_s")),
        (COMPILE_ROW, cell(lambda s: fmt_duration(s.get("compile_s")))),
        ("first-run overhead (first run - p50)", cell(lambda s: fmt_duration(s.get("first_run_overhead_s")))),
        ("cold start (to first image)", cell(lambda s: fmt_s(s["cold_start_s"]), "cold_start_s")),
        ("peak RSS", cell(lambda s: fmt_mib(s["peak_rss_mib"]), "memory")),
        (GPU_ROW, cell(lambda s: fmt_mib(s["peak_gpu_mib"]))),
    ]


def table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[Row], list[Row]]:
    """Column titles, stage rows and pipeline rows of a report."""
    baseline = report["config"]["baseline"]
    entries = []
    for name, entry in report["contenders"].items():
        error = _status(entry) if entry["status"] != "ok" else MISSING
        entries.append({**entry, "is_baseline": name == baseline, "error_cell": error[:60]})
    titles = [e["label"] for e in entries]
    measured = [bool(e.get("summary")) for e in entries]
    pipeline = _shown(_pipeline_rows(entries, int(report["config"]["workload"]["batch_size"])), measured)
    reference = psnr_reference(report)
    psnr = [
        MISSING if e["is_baseline"] and reference == baseline else fmt_psnr(e.get("agreement"))
        for e in entries
    ]
    pipeline.append((f"PSNR of first image vs {reference}", psnr))
    return titles, _shown(_stage_rows(entries), measured), pipeline


def _status(entry: Mapping[str, Any]) -> str:
    """``"failed: REASON"``, ``"skipped: REASON"``, ``"not run: REASON"``, or the status alone."""
    error = entry.get("error")
    return f"{entry['status']}: {error}" if error else str(entry["status"])


def _shown(rows: list[Row], measured: list[bool]) -> list[Row]:
    """Rows without the optional ones that no measured contender fills (a failed or skipped contender's
    cells carry its error, not a value)."""

    def filled(cells: list[str]) -> bool:
        return any(c != MISSING for c, ok in zip(cells, measured, strict=True) if ok)

    return [row for row in rows if row[0] not in OPTIONAL_ROWS or filled(row[1])]


REFERENCE_NAMES = {"cpu-fp32": "diffusers fp32 CPU", "cuda-fp32": "diffusers fp32 CUDA"}


def psnr_reference(report: Mapping[str, Any]) -> str:
    """What the PSNR column compares with: the baseline contender, or diffusers fp32 on the CPU or on
    the CUDA GPU."""
    config = report["config"]
    return REFERENCE_NAMES.get(str(config.get("psnr_reference")), str(config["baseline"]))


def render_terminal(report: Mapping[str, Any]) -> str:
    titles, stages, pipeline = table_rows(report)
    rows = [("Module", titles), *stages, ("Pipeline", titles), *pipeline]
    label_w = max(len(r[0]) for r in rows)
    widths = [max(len(r[1][i]) for r in rows) for i in range(len(titles))]
    rule = "|-" + "-|-".join("-" * w for w in (label_w, *widths)) + "-|"

    def line(label: str, cells: Sequence[str], center: bool = False) -> str:
        if center:
            parts = [label.center(label_w), *(c.center(w) for c, w in zip(cells, widths, strict=True))]
        else:
            parts = [label.ljust(label_w), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]
        return "| " + " | ".join(parts) + " |"

    out = [describe_run(report), *notes(report), rule, line("Module", titles, center=True), rule]
    out += [line(label, cells) for label, cells in stages]
    out += [rule, line("Pipeline", titles, center=True), rule]
    out += [line(label, cells) for label, cells in pipeline]
    out += [rule, _legend(report)]
    return "\n".join(out)


def _legend(report: Mapping[str, Any]) -> str:
    return (
        f"(Nx): ratio to {report['config']['baseline']}: speedup for times and rates, "
        "contender / baseline for memory."
    )


def _md_table(header: Sequence[str], rows: Sequence[Row], text_columns: int = 1) -> list[str]:
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    titles, stages, pipeline = table_rows(report)
    out = [f"**{describe_run(report)}**", ""]
    out += [line for note in notes(report) for line in (f"**{note}**", "")]
    out += _md_table(["Module", *titles], stages)
    out += [""]
    out += _md_table(["Pipeline", *titles], pipeline)
    out += ["", _legend(report), ""]
    return "\n".join(out)


def render_summary(reports: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table over several reports: a row per (run, contender)."""
    header = ["size", "contender", "latency p50", "vs baseline", "UNet/step", "it/s", "load", "cold start"]
    header += ["peak RSS", "PSNR vs baseline"]
    rows: list[Row] = []
    for report in reports:
        w = report["config"]["workload"]
        size = f"{w['width']}x{w['height']}"
        for name, e in report["contenders"].items():
            s, r = e.get("summary"), e.get("ratios")
            if not s:
                rows.append((size, [e["label"], _status(e)[:60], *[MISSING] * 7]))
                continue
            speed = MISSING if name == report["config"]["baseline"] or not r else _speed(r)
            psnr = MISSING if name == report["config"]["baseline"] else fmt_psnr(e.get("agreement"))
            cells = [
                e["label"],
                fmt_ms(s["latency_ms"]["p50"]),
                speed,
                fmt_ms(s["stages_ms"]["unet_per_step"]),
            ]
            cells += [f"{s['it_per_s']:.3f}", fmt_s(s["load_s"]), fmt_s(s["cold_start_s"])]
            cells += [fmt_mib(s["peak_rss_mib"]), psnr]
            rows.append((size, cells))
    return "\n".join(_md_table(header, rows, text_columns=2)) + "\n"


def _speed(ratios: Mapping[str, Any]) -> str:
    speedup = ratios["speedup"]["latency_p50"]
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
