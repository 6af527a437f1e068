"""A LoRA folder: its listing (the service's ``/sdapi/v1/loras``) and ``<lora:NAME>`` look-ups.

As in A1111, a folder is searched with its subfolders, and a name is a file's stem
(``PAseer.GoldenWind-SD1.5-V1`` for ``PAseer.GoldenWind-SD1.5-V1.safetensors``) or its alias,
kohya's ``ss_output_name`` metadata (``[XL]Bloodborne``). Look-ups try, in order: the exact path in
the folder (``sub/name``; ``name`` for a file at the top), the exact stem, the exact alias, then the
three again ignoring case; the first rule that finds something decides. Only headers are read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.adapters.files import ALIAS_KEY, SAFETENSORS, AdapterError, read_header

# What A1111 lists; pickled ones are found by name only so that read_lora can refuse them by name.
LORA_SUFFIXES = (SAFETENSORS, ".pt", ".ckpt")
LISTED_IN_ERRORS = 10


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA of a folder: its name (file stem), alias (``ss_output_name``), path and metadata."""

    name: str
    alias: str | None
    path: Path
    metadata: Mapping[str, str]


def lora_files(lora_dir: Path) -> list[Path]:
    """LoRA files under ``lora_dir`` (subfolders too), sorted by their path in it."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise AdapterError(f"LoRA folder {lora_dir} does not exist")
    files = [p for p in lora_dir.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(lora_dir).as_posix())


def _metadata(path: Path) -> Mapping[str, str]:
    """A safetensors file's metadata; empty for other files and for unreadable ones (reading the LoRA
    itself reports those)."""
    if path.suffix.lower() != SAFETENSORS:
        return {}
    try:
        return read_header(path).metadata
    except AdapterError:
        return {}


def list_loras(lora_dir: Path) -> list[LoraInfo]:
    """The .safetensors LoRAs under ``lora_dir``, sorted by path; AdapterError if it is no folder."""
    infos = []
    for path in lora_files(lora_dir):
        if path.suffix.lower() == SAFETENSORS:
            metadata = _metadata(path)
            infos.append(LoraInfo(path.stem, metadata.get(ALIAS_KEY) or None, path, metadata))
    return infos


def _path_names(path: Path, lora_dir: Path) -> tuple[str, ...]:
    relative = path.relative_to(lora_dir)
    return (relative.with_suffix("").as_posix(), relative.as_posix())


def _stem_names(path: Path, _: Path) -> tuple[str, ...]:
    return (path.stem, path.name)


def _pick(name: str, hits: list[Path], lora_dir: Path) -> Path:
    """The one file a rule found; a .safetensors beside pickles of the same name wins; else an error."""
    if len(hits) == 1:
        return hits[0]
    readable = [p for p in hits if p.suffix.lower() == SAFETENSORS]
    if len(readable) == 1:
        return readable[0]
    paths = [p.relative_to(lora_dir).as_posix() for p in hits]
    raise AdapterError(
        f"{name!r} names {len(hits)} LoRAs in {lora_dir}: {', '.join(paths)}; name one by its path in the "
        f"folder (e.g. {Path(paths[0]).with_suffix('').as_posix()})"
    )


def find_lora(name: str, lora_dir: Path) -> Path:
    """The file a ``<lora:NAME>`` tag names in ``lora_dir`` (see the module docstring for the rules).

    Raises AdapterError: no such folder; no such LoRA ("no LoRA named 'x' in DIR (have: a, b, ...)");
    two files equally matched (it lists them).
    """
    lora_dir = Path(lora_dir)
    files = lora_files(lora_dir)

    @functools.cache
    def _alias_names(path: Path, _: Path) -> tuple[str, ...]:  # headers read once, and only if needed
        alias = _metadata(path).get(ALIAS_KEY)
        return (alias,) if alias else ()

    rules: list[tuple[Callable[[Path, Path], Iterable[str]], bool]] = [
        (_path_names, False),
        (_stem_names, False),
        (_alias_names, False),
        (_path_names, True),
        (_stem_names, True),
        (_alias_names, True),
    ]
    folded = name.casefold()
    for names_of, ignore_case in rules:
        hits = [
            p
            for p in files
            if any((n.casefold() == folded) if ignore_case else (n == name) for n in names_of(p, lora_dir))
        ]
        if hits:
            return _pick(name, hits, lora_dir)
    stems = sorted({p.stem for p in files})
    listed = ", ".join(stems[:LISTED_IN_ERRORS])
    if len(stems) > LISTED_IN_ERRORS:
        listed += f", ... ({len(stems)} in all)"
    have = f"have: {listed}" if stems else "it holds no LoRAs"
    raise AdapterError(f"no LoRA named {name!r} in {lora_dir} ({have})")
