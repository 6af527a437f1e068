"""Work items of a batch render: one image each, keyed on its content.

An item's key is the sha256 of the engine's identity and the item's one-image request (prompt, settings
and this image's own seed) as canonical JSON: an edited jobs file changes exactly the keys of the images
it changes, and a different model or backend changes every key. File names derive from the row (its
index or ``id``) and the image's index in the row, never from time, counters or worker ids, so a rerun,
a restarted worker or two rows with the same prompt and seed never write over each other.

Torch-free and pickle-friendly: items travel to worker processes and Ray actors as plain values.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from engine.manifest import Manifest

SLUG_CHARS = 40  # of the prompt, in file names
_UNSAFE = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class EngineIdentity:
    """What decides the pixels besides the request: the exported weights and the backend.

    ``digest``: sha256 (hex) over the source model's hash, every graph's content hash, the scheduler
    config and the backend name. ``vae_scale_factor``: sizes must be multiples of it (checked up front).
    ``loras``: the LoRA files prompts' tags name (see :class:`LoraFingerprint`); None without a lora_dir.
    """

    digest: str
    vae_scale_factor: int
    loras: LoraFingerprint | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, manifest: Manifest, backend: str, lora_dir: Path | None = None) -> EngineIdentity:
        graphs = {network.value: entry.sha256 for network, entry in sorted(manifest.graphs.items())}
        content = {
            "source": manifest.source.get("sha256"),
            "graphs": graphs,
            "scheduler": dict(manifest.scheduler_config),
            "backend": str(backend),
        }
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        return cls(digest, manifest.dims.vae_scale_factor, LoraFingerprint(lora_dir) if lora_dir else None)


class LoraFingerprint:
    """What a prompt's ``<lora:NAME>`` tags resolve to in a LoRA folder: NAME -> the file's content
    (addnet) hash, "missing" when no file has that name, as canonical JSON ("" for a prompt without
    tags). Part of an item's key, so replacing a LoRA file renders its images again. Hashes are cached
    per file version (path, size, mtime) for the life of the object (one plan)."""

    def __init__(self, lora_dir: Path) -> None:
        self.lora_dir = Path(lora_dir)
        self._hashes: dict[tuple[str, int, int], str] = {}

    def __call__(self, prompts: Sequence[str]) -> str:
        from engine.adapters import AdapterError, find_lora, lora_hash
        from engine.text.prompt import extract_extra_networks

        names = sorted({tag.name for prompt in prompts for tag in extract_extra_networks(prompt)[1]})
        found: dict[str, str] = {}
        for name in names:
            try:
                path = find_lora(name, self.lora_dir)
                stat = path.stat()
            except (AdapterError, OSError):
                found[name] = "missing"
                continue
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = lora_hash(path)
            found[name] = self._hashes[key]
        return json.dumps(found, sort_keys=True) if found else ""


@dataclass(frozen=True)
class WorkItem:
    """One image to render.

    ``request``: the canonical JSON (sorted keys) of ``GenerationRequest.to_json()`` for this one image
    (one prompt, batch_size 1, its own seed); ``GenerationRequest.from_json(json.loads(request))``
    rebuilds it. ``file``: the PNG's name inside OUT_DIR. ``row``: the row's label (its ``id``, else its
    0-based index), ``line``: its 1-based line in the jobs file, ``image``: the image's 0-based index
    within the row (matrix combinations x images per seed).
    """

    key: str
    file: str
    row: str
    line: int
    image: int
    request: str

    @cached_property
    def settings(self) -> dict[str, Any]:
        """The request as a dict (``GenerationRequest.to_json()``'s keys)."""
        return json.loads(self.request)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "file": self.file,
            "row": self.row,
            "line": self.line,
            "image": self.image,
            "request": self.request,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkItem:
        return cls(
            str(data["key"]),
            str(data["file"]),
            str(data["row"]),
            int(data["line"]),
            int(data["image"]),
            str(data["request"]),
        )


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: equal values give equal strings (and equal keys)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def item_key(identity: EngineIdentity, request_json: str, loras: str = "") -> str:
    """Hex sha256 of the engine identity, a one-image request's canonical JSON and, when its prompt
    names LoRAs, their files' hashes (see :class:`LoraFingerprint`)."""
    tail = f"\n{loras}" if loras else ""
    return hashlib.sha256(f"{identity.digest}\n{request_json}{tail}".encode()).hexdigest()


def slug(text: str, limit: int = SLUG_CHARS) -> str:
    """A file-name-safe ASCII slug: lower case, runs of anything else as one ``-`` (``"A cat's hat!"``
    -> ``"a-cat-s-hat"``); empty text gives ``"image"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cut = _UNSAFE.sub("-", ascii_text.lower()).strip("-")[:limit].strip("-")
    return cut or "image"


def row_label(index: int, row_id: str | None) -> str:
    """A row's label in file names: its ``id`` as a slug, else its 0-based index as 5 digits."""
    return f"{index:05d}" if row_id is None else slug(row_id, limit=64)


def file_name(label: str, image: int, prompt: str, seed: int) -> str:
    """``<row label>-<image index, 3 digits>-<prompt slug>-s<seed>.png``: unique per (row, image)."""
    return f"{label}-{image:03d}-{slug(prompt)}-s{seed}.png"
