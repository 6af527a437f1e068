"""Render work items with one pipeline: the part every runner shares (in-process, worker processes,
Ray actors).

A batch of compatible items runs as one UNet batch (``Pipeline.run_batch``); each PNG is written to a
hidden temporary name beside its target, fsynced and renamed (:func:`engine.fsutil.write_atomic`), so
OUT_DIR never holds half a PNG. A bad item is caught here and comes back as an :class:`ItemResult`
carrying its one-line error, never raised: one bad row must not end a worker or a Ray job.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.batch.items import WorkItem
from engine.errors import EngineError
from engine.fsutil import write_atomic
from engine.infotext import png_info

log = logging.getLogger(__name__)

KEY_CHUNK = "sd-engine-key"  # a PNG text chunk holding the item's key: a finished PNG names its item


@dataclass(frozen=True)
class ItemResult:
    """What became of one item: ``sha256`` (hex, of the PNG's bytes) when it was written, else
    ``error`` (one line). ``timings``: milliseconds, the batch's stages (``total`` covers the whole
    batch of ``batch_images``) plus ``save`` for this PNG."""

    key: str
    file: str
    sha256: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "file": self.file,
            "sha256": self.sha256,
            "error": self.error,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemResult:
        timings = dict(data.get("timings") or {})
        return cls(data["key"], data["file"], data.get("sha256"), data.get("error"), timings)


def render_items(pipe: Any, items: Sequence[WorkItem], out_dir: Path) -> list[ItemResult]:
    """Render ``items`` (compatible ones as one UNet batch) into ``out_dir``; one result per item, in
    order. ``pipe``: an :class:`engine.pipeline.Pipeline`. Errors of the user's kind (EngineError: a
    bad setting, a size the model refuses, a non-finite output) become results; a batch that fails is
    retried one item at a time so only the bad item is marked."""
    requests, results = [], {}
    for item in items:
        try:
            requests.append((item, _request(item)))
        except EngineError as error:
            results[item.key] = ItemResult(item.key, item.file, error=_one_line(error))
    if len(requests) > 1:
        try:
            results.update(_render(pipe, requests, out_dir))
        except (EngineError, OSError):  # find the bad item: each alone
            for pair in requests:
                results.update(_render_alone(pipe, pair, out_dir))
    elif requests:
        results.update(_render_alone(pipe, requests[0], out_dir))
    return [results[item.key] for item in items]


def _render_alone(pipe: Any, pair: tuple[WorkItem, Any], out_dir: Path) -> dict[str, ItemResult]:
    item = pair[0]
    try:
        return _render(pipe, [pair], out_dir)
    except (EngineError, OSError) as error:  # a bad setting, a non-finite output, a file it cannot write
        return {item.key: ItemResult(item.key, item.file, error=_one_line(error))}


def _request(item: WorkItem) -> Any:
    """The item's GenerationRequest; RequestError (one line) when its JSON is not a valid request."""
    from engine.errors import RequestError
    from engine.pipeline.request import GenerationRequest

    try:
        data = json.loads(item.request)
    except ValueError as error:
        raise RequestError(f"the item's request is not valid JSON: {error}") from None
    return GenerationRequest.from_json(data)


def _render(pipe: Any, pairs: Sequence[tuple[WorkItem, Any]], out_dir: Path) -> dict[str, ItemResult]:
    outputs = pipe.run_batch([request for _, request in pairs])
    results = {}
    for (item, _), output in zip(pairs, outputs, strict=True):
        start = time.perf_counter()
        digest = save_item_png(output.images[0], out_dir / item.file, output.infotext(0), item.key)
        timings = {**output.timings, "batch_images": float(len(pairs))}
        timings["save"] = (time.perf_counter() - start) * 1000
        results[item.key] = ItemResult(item.key, item.file, sha256=digest, timings=timings)
    return results


def save_item_png(image: Any, path: Path, infotext: str, key: str) -> str:
    """Write the PNG (A1111 infotext + the item's key) atomically; returns the sha256 of its bytes."""
    info = png_info(infotext)
    info.add_text(KEY_CHUNK, key)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
