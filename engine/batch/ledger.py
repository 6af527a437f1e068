"""The files a render keeps in OUT_DIR besides its PNGs: the ledger, the error log, the seed records
and the lock.

``results.jsonl`` (the ledger) gets one line per finished image, appended and fsynced only after the
PNG is in place, so every line names a complete file. A kill -9 can leave at most a torn last line
(repaired on open) or a hidden temporary PNG (removed on open); a finished PNG without its line is
adopted when its key chunk names the item. An item is done when a ledger line with its key names a
file that exists with the recorded sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.batch.items import WorkItem
from engine.errors import EngineError
from engine.fsutil import write_atomic

LEDGER_NAME = "results.jsonl"
ERRORS_NAME = "errors.jsonl"
SEEDS_NAME = "seeds.json"
LOCK_NAME = ".render.lock"
# engine.fsutil.write_atomic's temporary names: ".<name>.<pid>-<8 hex>.tmp"
_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")


@dataclass(frozen=True)
class LedgerEntry:
    """One finished image: its item key, file (inside OUT_DIR), the PNG's sha256 (hex) and timings
    (milliseconds; empty when the file was copied from an equal item or adopted)."""

    key: str
    file: str
    sha256: str
    timings: Mapping[str, float] = field(default_factory=dict)
    row: str | None = None
    image: int | None = None

    def to_json(self) -> dict[str, Any]:
        fields = {"key": self.key, "file": self.file, "sha256": self.sha256, "row": self.row}
        return {**fields, "image": self.image, "timings": dict(self.timings)}


class Ledger:
    """``results.jsonl``, read on open and appended to; not thread-safe (the driver alone writes it)."""

    def __init__(self, out_dir: Path, writable: bool = True) -> None:
        """Read the ledger; ``writable`` False (a dry run) neither repairs nor creates the file."""
        self.out_dir = out_dir
        self.path = out_dir / LEDGER_NAME
        self._by_key: dict[str, list[LedgerEntry]] = {}
        self._hashes: dict[str, str | None] = {}  # file -> sha256 of its bytes (None: missing), this run
        for entry in _read_entries(self.path, repair=writable):
            self._by_key.setdefault(entry.key, []).append(entry)
        self._handle: TextIO | None = open(self.path, "a", encoding="utf-8") if writable else None  # noqa: SIM115

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._by_key.values())

    def append(self, entry: LedgerEntry) -> None:
        """Record a finished PNG: one line, flushed and fsynced before returning."""
        if self._handle is None:
            raise RuntimeError("the ledger was opened read-only")
        self._handle.write(json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._by_key.setdefault(entry.key, []).append(entry)
        self._hashes[entry.file] = entry.sha256

    def done(self, item: WorkItem) -> bool:
        """Whether the item's own file is recorded under its key and intact."""
        return any(e.file == item.file and self._intact(e) for e in self._by_key.get(item.key, ()))

    def source_of(self, item: WorkItem) -> LedgerEntry | None:
        """An intact finished file with the item's key (any name): its PNG can be copied, not rendered."""
        return next((e for e in self._by_key.get(item.key, ()) if self._intact(e)), None)

    def _intact(self, entry: LedgerEntry) -> bool:
        if entry.file not in self._hashes:
            path = self.out_dir / entry.file
            self._hashes[entry.file] = file_sha256(path) if path.is_file() else None
        return self._hashes[entry.file] == entry.sha256


def _read_entries(path: Path, repair: bool = True) -> Iterator[LedgerEntry]:
    """The ledger's complete lines; a torn last line (a kill -9 mid-append) is skipped, and with
    ``repair`` cut off the file."""
    if not path.exists():
        return
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            value = json.loads(line)
            timings = value.get("timings") or {}
            yield LedgerEntry(
                value["key"], value["file"], value["sha256"], timings, value.get("row"), value.get("image")
            )
        except (ValueError, KeyError, TypeError):
            raise EngineError(
                f"{path} line {number} is not a ledger entry; move the file away to start over"
            ) from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remove_temporaries(out_dir: Path) -> int:
    """Delete the hidden temporary files an interrupted render left (PNGs or records being written);
    returns how many. Call only under the render lock."""
    removed = 0
    for path in out_dir.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def render_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT_DIR for one render: a second render into the same folder is refused, in one line."""
    handle = open(out_dir / LOCK_NAME, "a")  # noqa: SIM115 (closed below)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EngineError(f"another sd-engine render is writing to {out_dir}") from None
        os.set_inheritable(handle.fileno(), False)
        yield
    finally:
        handle.close()


def read_seeds(out_dir: Path) -> dict[str, int]:
    """The random base seeds chosen by earlier runs (seeds.json), by row seed key."""
    path = out_dir / SEEDS_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(key): int(value) for key, value in data.items()}
    except (ValueError, AttributeError, TypeError):
        raise EngineError(f"{path} is corrupt; remove it (random seeds will be drawn again)") from None


def write_seeds(out_dir: Path, seeds: Mapping[str, int]) -> None:
    """Store the random base seeds atomically, before any image that uses them is rendered."""
    write_atomic(out_dir / SEEDS_NAME, json.dumps(dict(sorted(seeds.items())), indent=1) + "\n")


class ErrorLog:
    """``errors.jsonl``: this run's bad rows and failed items, one JSON object a line (rewritten by
    each run: a fixed row disappears from it)."""

    def __init__(self, out_dir: Path, first: list[dict[str, Any]]) -> None:
        self.path = out_dir / ERRORS_NAME
        write_atomic(self.path, "".join(_line(record) for record in first))
        self.count = len(first)
        self._handle: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(_line(record))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.count += 1

    def close(self) -> None:
        self._handle.close()


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(dict(record), ensure_ascii=False) + "\n"
