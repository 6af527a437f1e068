"""Prompts for benchmark runs: a short built-in list, or a file (txt, TSV with a Prompt column, JSONL).

Prompt text does not change the cost of a run (CLIP always sees 77 tokens); prompts vary so that
no layer of caching can answer a run from an earlier one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

BUILTIN_PROMPTS = (
    "a lighthouse on a cliff at dusk, dramatic sky, oil painting",
    "a red fox in fresh snow, morning light, telephoto photograph",
    "an isometric cutaway of a tiny robot workshop, soft colors",
    "a bowl of ramen on a wooden table, steam, studio lighting",
)
PROMPT_COLUMN = "prompt"


def load_prompts(path: Path | None) -> tuple[str, ...]:
    """The prompts of ``path`` by its suffix (.txt, .tsv, .jsonl); the built-in list for None."""
    if path is None:
        return BUILTIN_PROMPTS
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompt file {path}: {error}") from None
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        prompts = _tsv_prompts(text, path)
    elif suffix in (".jsonl", ".ndjson"):
        prompts = _jsonl_prompts(text, path)
    elif suffix in (".txt", ""):
        prompts = _txt_prompts(text)
    else:
        raise ValueError(f"prompt file {path} must be .txt, .tsv (with a Prompt column) or .jsonl")
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _txt_prompts(text: str) -> tuple[str, ...]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _tsv_prompts(text: str, path: Path) -> tuple[str, ...]:
    """The Prompt column (any case), as in PartiPrompts.tsv."""
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or ()}
    if PROMPT_COLUMN not in columns:
        raise ValueError(f"prompt file {path} has no Prompt column (columns: {', '.join(columns) or 'none'})")
    column = columns[PROMPT_COLUMN]
    return tuple(p for p in ((row.get(column) or "").strip() for row in reader) if p)


def _jsonl_prompts(text: str, path: Path) -> tuple[str, ...]:
    """One JSON value a line: a string, or an object with a "prompt" (or "Prompt") field."""
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if isinstance(value, dict):
            value = value.get("prompt", value.get("Prompt"))
        if not isinstance(value, str):
            raise ValueError(f'{path}:{number}: expected a string or an object with a "prompt" field')
        if value.strip():
            prompts.append(value.strip())
    return tuple(prompts)
