"""What the render tests share: jobs rows of the tiny engine, the CLI call, readers of OUT_DIR."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.batch.ledger import ERRORS_NAME, LEDGER_NAME
from engine.cli import main

SIZE = {"width": 64, "height": 64, "steps": 2}
ROWS = [
    {"prompt": "a red cube", "seed": 11, **SIZE},
    {"prompt": "a blue sphere", "negative_prompt": "blurry", "seed": 5, "n": 2, **SIZE},
    {"prompt": "a green cone", "seed": 7, "sampler": "DDIM", "guidance_scale": 5.0, **SIZE},
    {"prompt": 'it\'s a "quoted" prompt', "seed": 3, **SIZE},
]
IMAGES = 5  # ROWS' images


def write_jobs(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def run_render(jobs: Path, out: Path, engine: Path, *flags: str) -> int:
    return main(["render", str(jobs), str(out), "--engine", str(engine), *flags])


def ledger(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / LEDGER_NAME).read_text().splitlines()]


def errors(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / ERRORS_NAME).read_text().splitlines()]


def pngs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.png") if not p.name.startswith("contact-sheet"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
