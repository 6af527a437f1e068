"""Regressions against a saved run: ``sd-engine bench ... --compare BASELINE.json --threshold 0.10``.

Both reports are summarized from their samples, then every metric of every contender they share is
compared; a metric regresses when it is worse than the saved one by more than the threshold (10%
by default). Runs of different work (size, steps, sampler, CFG, batch) are not comparable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.bench.stats import finalize

SCHEMA_PREFIX = "sd-engine-bench/"
# (metric, unit, how to read it from a summary); all are lower-is-better.
METRICS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float | None]], ...] = (
    ("latency p50", "ms", lambda s: s["latency_ms"]["p50"]),
    ("text encoder", "ms", lambda s: s["stages_ms"]["text_encoder"]),
    ("UNet per step", "ms", lambda s: s["stages_ms"]["unet_per_step"]),
    ("VAE decode", "ms", lambda s: s["stages_ms"]["vae_decode"]),
    ("cold start", "s", lambda s: s["cold_start_s"]),
    ("peak RSS", "MiB", lambda s: s["peak_rss_mib"]),
)


@dataclass(frozen=True)
class Change:
    contender: str
    metric: str
    unit: str
    before: float
    after: float
    regressed: bool

    @property
    def relative(self) -> float:
        return (self.after - self.before) / self.before if self.before else 0.0


def read_report(path: Path) -> dict[str, Any]:
    """A saved benchmark report; ValueError saying why it cannot be used."""
    if not path.is_file():
        raise ValueError(f"benchmark report not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read benchmark report {path}: {error}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(SCHEMA_PREFIX):
        raise ValueError(f"{path} is not an sd-engine benchmark report (no {SCHEMA_PREFIX} schema)")
    try:
        return finalize(data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ValueError(f"benchmark report {path} is incomplete or corrupt ({error!r})") from None


def check_comparable(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    keys = ("width", "height", "steps", "guidance_scale", "sampler", "batch_size")
    old, new = before["config"]["workload"], after["config"]["workload"]
    differ = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    if differ:
        raise ValueError("the baseline report measured different work: " + ", ".join(differ))


def compare(before: Mapping[str, Any], after: Mapping[str, Any], threshold: float) -> list[Change]:
    """Every shared contender's metrics, each flagged when worse by more than ``threshold``."""
    check_comparable(before, after)
    shared = [
        name
        for name, entry in after["contenders"].items()
        if entry.get("summary") and (before["contenders"].get(name) or {}).get("summary")
    ]
    if not shared:
        raise ValueError("the baseline report has no successful contender in common with this run")
    changes = []
    for name in shared:
        old, new = before["contenders"][name]["summary"], after["contenders"][name]["summary"]
        for metric, unit, get in METRICS:
            a, b = get(old), get(new)
            if a is None or b is None:
                continue
            changes.append(Change(name, metric, unit, float(a), float(b), b > a * (1 + threshold)))
    return changes


def render_changes(changes: list[Change], threshold: float) -> str:
    width = max(len(f"{c.contender} {c.metric}") for c in changes)
    lines = [f"compared with the baseline report (regression: worse by more than {threshold:.0%})"]
    for c in changes:
        flag = "REGRESSION" if c.regressed else "ok"
        name = f"{c.contender} {c.metric}".ljust(width)
        lines.append(f"  {name}  {c.before:10.1f} -> {c.after:10.1f} {c.unit:3s}  {c.relative:+7.1%}  {flag}")
    count = sum(c.regressed for c in changes)
    lines.append(f"{count} regression{'s' if count != 1 else ''}")
    return "\n".join(lines)
