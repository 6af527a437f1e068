"""The engine folders a server serves: their A1111 / OpenAI identities, and the loaded pipelines held
in a least-recently-used cache bounded by a memory budget.

Names in requests resolve only against this list (title, model name, folder name or hash), so nothing
a client sends reaches the file system.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError, RequestError
from engine.manifest import read_manifest

if TYPE_CHECKING:
    from engine.pipeline import Pipeline

log = logging.getLogger("sd-engine.serve")


@dataclass(frozen=True)
class EngineEntry:
    """One served engine folder. ``name`` (the folder's name) is unique; ``title`` is A1111's
    ``"<model_name> [<short hash>]"`` (``<model_name>`` alone without a recorded hash)."""

    name: str
    path: Path
    model_name: str
    short_hash: str | None
    sha256: str | None
    filename: str
    weight_bytes: int
    vae_scale_factor: int = 8

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.short_hash}]" if self.short_hash else self.model_name

    def names(self) -> tuple[str, ...]:
        """Every string that names this engine in a request."""
        keys = (self.name, self.title, self.model_name, self.short_hash, self.sha256)
        return tuple(k for k in keys if k)

    def a1111(self) -> dict[str, Any]:
        """An entry of GET /sdapi/v1/sd-models."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.short_hash,
            "sha256": self.sha256,
            "filename": self.filename,
            "config": None,
        }


def read_entry(path: Path) -> EngineEntry:
    """An engine folder's identity from its manifest; EngineError (one line) for a folder that is not one."""
    manifest = read_manifest(path)
    source = manifest.source
    model_name = source.get("name") or path.resolve().name
    files = [p for p in path.rglob("*") if p.is_file()]
    return EngineEntry(
        name=path.resolve().name,
        path=path,
        model_name=str(model_name),
        short_hash=source.get("short_hash"),
        sha256=source.get("sha256"),
        filename=str(source.get("path") or path.resolve()),
        weight_bytes=sum(p.stat().st_size for p in files if p.suffix in (".onnx", ".data", ".bin")),
        vae_scale_factor=manifest.dims.vae_scale_factor,
    )


class Catalog:
    """The served engines, in the order given (the first is the starting default)."""

    def __init__(self, entries: Sequence[EngineEntry]) -> None:
        if not entries:
            raise EngineError("serve needs at least one engine folder")
        names = [entry.name for entry in entries]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate:
            raise EngineError(f"two engine folders are both named {duplicate!r}; serve names them by folder")
        self.entries = tuple(_unique_titles(entries))

    @classmethod
    def open(cls, paths: Sequence[Path]) -> Catalog:
        return cls([read_entry(Path(p)) for p in paths])

    def find(self, key: str, field: str = "model") -> EngineEntry:
        """The entry a request names; RequestError naming the field and the served titles otherwise."""
        exact = [entry for entry in self.entries if key in (entry.name, entry.title)]
        found = exact or [entry for entry in self.entries if key in entry.names()]
        if len(found) == 1:
            return found[0]
        served = ", ".join(f"{entry.name} ({entry.title})" for entry in self.entries)
        if found:
            names = ", ".join(entry.name for entry in found)
            raise RequestError(f"{field}: {key!r} names several served models ({names}); use a folder name")
        raise RequestError(f"{field}: no served model is called {key!r}; served: {served}")


def _unique_titles(entries: Sequence[EngineEntry]) -> list[EngineEntry]:
    """Engines exported from the same model share its name and hash: those go by their folder's name,
    so every title names one engine."""
    titles = [entry.title for entry in entries]
    return [replace(e, model_name=e.name) if titles.count(e.title) > 1 else e for e in entries]


class PipelinePool:
    """Loaded pipelines, least recently used first out when the budget (bytes of ONNX weights) is
    passed; a pipeline in use is never evicted. ``load`` makes a Pipeline from an entry."""

    def __init__(self, load: Callable[[EngineEntry], Pipeline], budget_bytes: int | None) -> None:
        self._load = load
        self._budget = budget_bytes
        self._loaded: OrderedDict[str, tuple[EngineEntry, Pipeline]] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one load at a time: two loads at once would pass the budget

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def acquire(self, entry: EngineEntry) -> Pipeline:
        """The entry's pipeline, loaded if needed (evicting idle ones over budget); release() after use."""
        with self._loading:
            with self._lock:
                if entry.name in self._loaded:
                    self._loaded.move_to_end(entry.name)
                    self._in_use[entry.name] = self._in_use.get(entry.name, 0) + 1
                    return self._loaded[entry.name][1]
                self._evict_for(entry.weight_bytes)
            pipeline = self._load(entry)  # outside the lock: minutes for a big model
            with self._lock:
                self._loaded[entry.name] = (entry, pipeline)
                self._in_use[entry.name] = self._in_use.get(entry.name, 0) + 1
            return pipeline

    def release(self, entry: EngineEntry) -> None:
        with self._lock:
            self._in_use[entry.name] -= 1

    def _evict_for(self, incoming: int) -> None:
        if self._budget is None:
            return
        used = sum(e.weight_bytes for e, _ in self._loaded.values())
        for name in list(self._loaded):
            if used + incoming <= self._budget:
                return
            if self._in_use.get(name, 0) == 0:
                entry, _ = self._loaded.pop(name)
                used -= entry.weight_bytes
                log.info("unloaded %s (memory budget)", name)
        if used + incoming > self._budget:
            log.warning("loading %s passes the memory budget: every loaded model is in use", incoming)
