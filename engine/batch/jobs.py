"""Jobs files -> work items: rows of a JSONL, TXT, TSV or CSV file times the command line's matrix.

A row is one prompt with optional settings. Its images are the product, in this order, of sizes x steps
x samplers x guidance x seeds (A1111's X/Y/Z plot; a setting the row gives itself replaces that axis),
then ``n`` images per seed (seed, seed+1, ..., as A1111's batch). A random seed (-1 or null) gets one
base seed per (row, seed position), chosen with :mod:`secrets` and looked up first in the seeds a
previous run stored, so a resumed render makes the same images.

Fatal problems (no such file, unknown format, not UTF-8, no Prompt column, no rows, clashing row labels,
a bad matrix value) raise :class:`EngineError` up front; a bad row (bad JSON, an unknown field or
sampler, a bad size) becomes a :class:`RowError` with its line and the other rows go on.

Torch-free: this runs in the driver before any model loads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.batch.items import (
    EngineIdentity,
    WorkItem,
    canonical_json,
    file_name,
    item_key,
    row_label,
)
from engine.errors import EngineError, RequestError
from engine.pipeline.request import MAX_SEED, GenerationRequest
from engine.sampling.registry import resolve

MAX_IMAGES = 1000  # images per seed of one row (``n``): a typo must not plan a billion items
MAX_SEEDS = 100_000  # values one --seeds flag may expand to
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = {".tsv": "\t", ".csv": ","}
SUFFIXES = (*JSONL_SUFFIXES, ".txt", *TABLE_SUFFIXES)
PROMPT_COLUMNS = ("prompt", "prompts")  # PartiPrompts: "Prompt"; DrawBench's CSV: "Prompts"

# Accepted field name -> the field it sets (JSONL keys exactly; TSV/CSV headers case-insensitively).
FIELDS: Mapping[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "steps": "steps",
    "width": "width",
    "height": "height",
    "size": "size",
    "sampler": "sampler",
    "sampler_name": "sampler",
    "guidance_scale": "guidance_scale",
    "cfg_scale": "guidance_scale",
    "cfg": "guidance_scale",
    "guidance_rescale": "guidance_rescale",
    "clip_skip": "clip_skip",
    "n": "n",
    "batch_size": "n",
    "images": "n",
    "id": "id",
}
IMG2IMG_FIELDS = ("image", "init_image", "init_images", "mask", "strength", "denoising_strength")
_INTEGER = ("steps", "width", "height", "clip_skip", "n")
_NUMBER = ("guidance_scale", "guidance_rescale")
# The command line's flag for each Matrix field, for error messages.
FLAGS: Mapping[str, str] = {
    "seeds": "--seeds",
    "samplers": "--samplers",
    "cfg": "--cfg",
    "steps": "--steps",
    "sizes": "--size",
    "negative_prompt": "--negative",
    "images": "--images",
    "clip_skip": "--clip-skip",
}

_DEFAULTS: Mapping[str, Any] = {f.name: f.default for f in fields(GenerationRequest)}
_LINE_END = re.compile(r"\r\n|\r|\n")
_SEED_PART = re.compile(r"(-1|\d+)(?:-(\d+))?")
_SIZE = re.compile(r"(\d+)\s*[xX×]\s*(\d+)")
_INT_TEXT = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Matrix:
    """The command line's defaults and X/Y/Z axes; an empty tuple / None: the flag was not given.

    A flag with several values is an axis (every row gets every value) unless the row sets that field.
    ``seeds``: -1 is random; ``sizes``: (width, height) pixels; ``images``: images per seed (a row's n).
    """

    seeds: tuple[int, ...] = ()
    samplers: tuple[str, ...] = ()
    cfg: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()
    negative_prompt: str | None = None
    images: int | None = None
    clip_skip: int | None = None


@dataclass(frozen=True)
class RowError:
    """A row that makes no images: ``line`` 1-based in the jobs file (0: not tied to a line),
    ``row`` its label when known, ``error`` one line."""

    line: int
    row: str | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "row": self.row, "error": self.error}


@dataclass(frozen=True)
class Plan:
    """``items`` in row order, then image order; ``errors`` the bad rows; ``seeds`` every random base
    seed the items use, by row seed key (the stored ones it reused and the new ones): store them before
    rendering so a resumed run picks the same."""

    items: tuple[WorkItem, ...]
    errors: tuple[RowError, ...]
    seeds: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    """One non-blank row: ``index`` 0-based among the rows, ``line`` its first line (1-based);
    ``fields`` normalized (canonical names, typed values, ``seed`` None = random) or None with ``error``."""

    index: int
    line: int
    row_id: str | None
    fields: Mapping[str, Any] | None
    error: str | None = None

    @property
    def label(self) -> str:
        return row_label(self.index, self.row_id)


# -- flags --------------------------------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"1-4,7,10-11"`` -> (1, 2, 3, 4, 7, 10, 11); ``"-1"``: random. Raises ValueError (one line)."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEED_PART.fullmatch(part.strip().replace(" ", ""))
        if match is None:
            raise ValueError(f"seeds: {part.strip()!r} is not a seed or a range (e.g. 1-4,7; -1 for random)")
        low = int(match.group(1))
        high = low if match.group(2) is None else int(match.group(2))
        if high > MAX_SEED or low > high or (low < 0 and match.group(2) is not None):
            raise ValueError(f"seeds: {part.strip()!r} is not a range within 0..{MAX_SEED}")
        if len(seeds) + high - low + 1 > MAX_SEEDS:
            raise ValueError(f"seeds: {text.strip()!r} gives more than {MAX_SEEDS} seeds")
        seeds.extend(range(low, high + 1))
    return tuple(seeds)


def parse_list(text: str, kind: type) -> tuple[Any, ...]:
    """A comma-separated flag: ``"Euler a,DDIM"`` with str, ``"5,7.5"`` with float, ``"20,30"`` with int.
    Values are stripped; an empty value, a non-number or a non-finite float raises ValueError (one line)."""
    if kind not in (str, int, float):
        raise TypeError(f"parse_list takes str, int or float, not {kind!r}")
    values = []
    for part in text.split(","):
        value = part.strip()
        if not value:
            raise ValueError(f"{text.strip()!r} has an empty value (a list is comma-separated: a,b,c)")
        values.append(value if kind is str else _number_text(value, kind))
    return tuple(values)


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> (512, 768) (width, height). Raises ValueError (one line)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"size must be WIDTHxHEIGHT like 512x768, got {text.strip()!r}")
    return int(match.group(1)), int(match.group(2))


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"64x64,128x96"`` -> ((64, 64), (128, 96)). Raises ValueError (one line)."""
    return tuple(parse_size(part) for part in parse_list(text, str))


def _number_text(text: str, kind: type) -> int | float:
    if kind is int:
        if _INT_TEXT.fullmatch(text) is None:
            raise ValueError(f"{text!r} is not an integer")
        return int(text)
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return number


# -- planning -----------------------------------------------------------------------------------


def plan_jobs(path: Path, matrix: Matrix, identity: EngineIdentity, stored_seeds: Mapping[str, int]) -> Plan:
    """Every image of ``path``'s rows under ``matrix``, keyed for ``identity``.

    ``stored_seeds``: random base seeds a previous plan returned (``Plan.seeds``), reused by row seed key.
    Raises EngineError (one line) for a bad matrix value, an unreadable or empty jobs file, a table
    without a Prompt column, rows whose labels (ids) clash, or two images given the same file name.
    """
    _check_matrix(matrix, identity)
    rows = _read_rows(Path(path))
    _check_labels(rows)
    items: list[WorkItem] = []
    errors: list[RowError] = []
    seeds: dict[str, int] = {}
    names = seed_names(rows)
    for row in rows:
        if row.fields is None:
            errors.append(RowError(row.line, row.label, str(row.error)))
            continue
        try:
            row_items, row_seeds = _row_items(row, names[row.index], matrix, identity, stored_seeds)
        except RequestError as error:
            errors.append(RowError(row.line, row.label, _one_line(error)))
            continue
        items.extend(row_items)
        seeds.update(row_seeds)
    _check_files(items)
    return Plan(tuple(items), tuple(errors), seeds)


def seed_names(rows: Sequence[_Row]) -> dict[int, str]:
    """Each row's name for its random seeds, by row index: ``id:<id>`` when it has one, else ``#k`` for
    the k-th row (0-based) with the same fields. Not its position: inserting or removing other rows
    must not draw new seeds (and re-render) the rows after them."""
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for row in rows:
        if row.row_id is not None:
            names[row.index] = f"id:{row.row_id}"
            continue
        content = canonical_json({k: v for k, v in (row.fields or {}).items() if k != "seed"})
        names[row.index] = f"#{seen.get(content, 0)}"
        seen[content] = seen.get(content, 0) + 1
    return names


def _row_items(
    row: _Row, seed_name: str, matrix: Matrix, identity: EngineIdentity, stored_seeds: Mapping[str, int]
) -> tuple[list[WorkItem], dict[str, int]]:
    """The row's items in image order and the random base seeds they use. Raises RequestError."""
    own = dict(row.fields or {})
    n = own.get("n", matrix.images if matrix.images is not None else 1)
    bases, random_bases = _bases(seed_name, own, matrix, n, stored_seeds)
    settings = {
        "negative": own.get("negative_prompt", matrix.negative_prompt or ""),
        "guidance_rescale": own.get("guidance_rescale", _DEFAULTS["guidance_rescale"]),
        "clip_skip": own.get("clip_skip", _first(_given(matrix.clip_skip), _DEFAULTS["clip_skip"])),
    }
    sizes = _sizes(own, matrix)
    for width, height in sizes:
        _check_side("width", width, identity.vae_scale_factor)
        _check_side("height", height, identity.vae_scale_factor)
    items: list[WorkItem] = []
    for (width, height), steps, sampler, cfg in _combinations(own, matrix, sizes):
        for base in bases:
            for seed in range(base, base + n):
                request = GenerationRequest.create(
                    own["prompt"],
                    settings["negative"],
                    steps=steps,
                    guidance_scale=cfg,
                    guidance_rescale=settings["guidance_rescale"],
                    clip_skip=settings["clip_skip"],
                    width=width,
                    height=height,
                    sampler=sampler,
                    seed=seed,
                    batch_size=1,
                )
                items.append(_item(row, len(items), request, identity))
    return items, random_bases


def _item(row: _Row, image: int, request: GenerationRequest, identity: EngineIdentity) -> WorkItem:
    request_json = canonical_json(request.to_json())
    name = file_name(row.label, image, request.prompts[0], request.seed)
    loras = identity.loras(request.prompts) if identity.loras is not None else ""
    return WorkItem(item_key(identity, request_json, loras), name, row.label, row.line, image, request_json)


def _combinations(
    own: Mapping[str, Any], matrix: Matrix, sizes: Sequence[tuple[int, int]]
) -> Iterator[tuple[tuple[int, int], int, str, float]]:
    """(size, steps, sampler, guidance) in axis order; each axis the row's value, else the flag's."""
    steps = _axis(own, "steps", matrix.steps)
    samplers = _axis(own, "sampler", matrix.samplers)
    cfgs = _axis(own, "guidance_scale", matrix.cfg)
    for size in sizes:
        for step in steps:
            for sampler in samplers:
                for cfg in cfgs:
                    yield size, step, sampler, cfg


def _axis(own: Mapping[str, Any], name: str, values: Sequence[Any]) -> Sequence[Any]:
    if name in own:
        return (own[name],)
    return tuple(values) or (_DEFAULTS[name],)


def _sizes(own: Mapping[str, Any], matrix: Matrix) -> list[tuple[int, int]]:
    """The size axis: the row's width and height replace the flag's sizes side by side."""
    flag_sizes = tuple(matrix.sizes) or ((_DEFAULTS["width"], _DEFAULTS["height"]),)
    sizes = [(own.get("width", width), own.get("height", height)) for width, height in flag_sizes]
    return list(dict.fromkeys(sizes))  # a row's width over sizes that differ only in width: once


def _bases(
    seed_name: str, own: Mapping[str, Any], matrix: Matrix, n: int, stored: Mapping[str, int]
) -> tuple[list[int], dict[str, int]]:
    """The base seed of each seed position and the random ones by row seed key. Raises RequestError."""
    if "seed" in own:
        seeds: Sequence[int | None] = (own["seed"],)
    else:
        seeds = tuple(None if seed == -1 else seed for seed in matrix.seeds) or (None,)
    top = MAX_SEED - n + 1
    bases: list[int] = []
    random_bases: dict[str, int] = {}
    for position, seed in enumerate(seeds):
        if seed is not None:
            if not 0 <= seed <= top:
                span = f" (its {n} images take seed..seed+{n - 1})" if n > 1 else ""
                raise RequestError(f"seed must be -1 (random) or an integer in 0..{top}{span}, got {seed}")
            bases.append(seed)
            continue
        key = row_seed_key(seed_name, own, n, position)
        base = stored.get(key)
        if not (isinstance(base, int) and not isinstance(base, bool) and 0 <= base <= top):
            base = secrets.randbelow(top + 1)
        bases.append(base)
        random_bases[key] = base
    return bases, random_bases


def row_seed_key(name: str, own: Mapping[str, Any], n: int, position: int) -> str:
    """Hex sha256 naming a random base seed: the row's seed name (:func:`seed_names`), its own fields
    but ``seed`` and ``id`` (normalized: canonical names and types), its images per seed and the seed
    axis position."""
    content = {k: v for k, v in own.items() if k not in ("seed", "id")}
    text = canonical_json({"row": name, "fields": content, "n": n, "seed_position": position})
    return hashlib.sha256(text.encode()).hexdigest()


def _check_side(name: str, side: int, factor: int) -> None:
    if side % factor:
        raise RequestError(f"{name} must be a multiple of {factor}, got {side}")


def _check_labels(rows: Sequence[_Row]) -> None:
    """Two rows with the same label would write the same files: refuse up front."""
    clash = _first_clash(rows, lambda row: row.label)
    if clash:
        first, row = clash
        raise EngineError(
            f"rows on lines {first.line} and {row.line} both get the file label {row.label!r} "
            f"({_label_source(first)} and {_label_source(row)}): give them distinct ids"
        )


def _label_source(row: _Row) -> str:
    return f"row index {row.index}" if row.row_id is None else f"id {row.row_id!r}"


def _check_files(items: Sequence[WorkItem]) -> None:
    """A safety net: labels, image indexes and slugs could still spell one name two ways."""
    clash = _first_clash(items, lambda item: item.file)
    if clash:
        first, item = clash
        raise EngineError(
            f"rows on lines {first.line} and {item.line} both name an image {item.file!r}: "
            "give them distinct ids"
        )


def _first_clash(things: Sequence[Any], name: Callable[[Any], str]) -> tuple[Any, Any] | None:
    """The first two of ``things`` with the same name, in order; None when every name is unique."""
    seen: dict[str, Any] = {}
    for thing in things:
        first = seen.setdefault(name(thing), thing)
        if first is not thing:
            return first, thing
    return None


def _check_matrix(matrix: Matrix, identity: EngineIdentity) -> None:
    """Every flag value, alone, must make a valid request: a bad one is fatal (every row would fail)."""
    checks: list[tuple[str, dict[str, Any]]] = [
        *(("samplers", {"sampler": value}) for value in matrix.samplers),
        *(("cfg", {"guidance_scale": value}) for value in matrix.cfg),
        *(("steps", {"steps": value}) for value in matrix.steps),
        *(("sizes", {"width": w, "height": h}) for w, h in matrix.sizes),
        *(("clip_skip", {"clip_skip": value}) for value in _given(matrix.clip_skip)),
    ]
    try:
        for name, settings in checks:
            _flag_check(name, settings, identity)
        images = 1 if matrix.images is None else matrix.images
        if not (_is_int(images) and 1 <= images <= MAX_IMAGES):
            raise RequestError(f"--images must be an integer in 1..{MAX_IMAGES}, got {images!r}")
        for seed in matrix.seeds:
            if not (_is_int(seed) and (seed == -1 or 0 <= seed <= MAX_SEED - images + 1)):
                raise RequestError(f"--seeds: {seed!r} is not -1 or a seed in 0..{MAX_SEED - images + 1}")
        negative = matrix.negative_prompt
        if negative is not None and not isinstance(negative, str):
            raise RequestError(f"--negative must be a string, got {negative!r}")
    except RequestError as error:
        raise EngineError(_one_line(error)) from None


def _flag_check(name: str, settings: dict[str, Any], identity: EngineIdentity) -> None:
    try:
        request = GenerationRequest.create("flag check", seed=0, **settings)
        if name == "sizes":
            _check_side("width", request.width, identity.vae_scale_factor)
            _check_side("height", request.height, identity.vae_scale_factor)
    except RequestError as error:
        raise RequestError(f"{FLAGS[name]}: {error}") from None


def _given(value: Any) -> tuple[Any, ...]:
    return () if value is None else (value,)


def _first(values: Sequence[Any], default: Any) -> Any:
    return values[0] if values else default


# -- reading ------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[_Row]:
    """The file's non-blank rows, parsed and normalized (a bad row keeps its error). Raises EngineError
    for an unknown suffix, a missing, unreadable or non-UTF-8 file, a bad table header or no rows."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        kind = repr(path.suffix) if path.suffix else "(no suffix)"
        raise EngineError(
            f"jobs file {path}: unknown type {kind}; use .jsonl or .ndjson (one JSON request a line), "
            ".txt (one prompt a line), .tsv or .csv (with a Prompt column)"
        )
    lines = _read_lines(path)
    if suffix in JSONL_SUFFIXES:
        rows = list(_jsonl_rows(lines))
    elif suffix == ".txt":
        rows = list(_txt_rows(lines))
    else:
        rows = list(_table_rows(path, lines, TABLE_SUFFIXES[suffix]))
    if not rows:
        raise EngineError(f"jobs file {path} has no rows")
    return rows


def _read_lines(path: Path) -> list[str]:
    """The file's lines without their ends (CRLF, CR or LF), a UTF-8 BOM dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EngineError(f"jobs file {path} does not exist") from None
    except IsADirectoryError:
        raise EngineError(f"jobs file {path} is a folder, not a file") from None
    except OSError as error:
        raise EngineError(f"cannot read jobs file {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise EngineError(f"jobs file {path} is not UTF-8 text (line {line}, byte {error.start})") from None
    return _LINE_END.split(text)


def _numbered(lines: Sequence[str]) -> Iterator[tuple[int, int, str]]:
    """(row index, 1-based line, text) of each non-blank line."""
    index = 0
    for number, text in enumerate(lines, start=1):
        if text.strip():
            yield index, number, text
            index += 1


def _txt_rows(lines: Sequence[str]) -> Iterator[_Row]:
    for index, line, text in _numbered(lines):
        yield _Row(index, line, None, {"prompt": text.strip()})


def _jsonl_rows(lines: Sequence[str]) -> Iterator[_Row]:
    for index, line, text in _numbered(lines):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            yield _Row(index, line, None, None, f"bad JSON: {error.msg} (column {error.colno})")
            continue
        if not isinstance(data, dict):
            yield _Row(index, line, None, None, f"a row must be a JSON object, got {_json_type(data)}")
            continue
        yield _parse_row(index, line, data, from_text=False)


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _table_rows(path: Path, lines: Sequence[str], delimiter: str) -> Iterator[_Row]:
    """TSV (no quoting at all: a quote is text) or CSV (standard quoting) rows under a header."""
    records = (record for record in _split_records(lines, delimiter) if not _blank(record[1]))
    first = next(records, None)
    if first is None:
        return
    header = first[1]
    if isinstance(header, str):
        raise EngineError(f"jobs file {path}: the header on line {first[0]} is not valid CSV: {header}")
    columns = _columns(path, header)
    for index, (line, cells) in enumerate(records):
        if isinstance(cells, str):
            yield _Row(index, line, None, None, cells)
        elif len(cells) != len(header):
            stray = "tab" if delimiter == "\t" else "comma or quote"
            problem = f"{len(cells)} fields where the header has {len(header)} (a stray {stray}?)"
            yield _Row(index, line, None, None, problem)
        else:
            data = {name: cells[i].strip() for i, name in columns.items() if cells[i].strip()}
            yield _parse_row(index, line, data, from_text=True)


def _blank(cells: list[str] | str) -> bool:
    return isinstance(cells, list) and not any(cell.strip() for cell in cells)


def _split_records(lines: Sequence[str], delimiter: str) -> Iterator[tuple[int, list[str] | str]]:
    if delimiter == "\t":
        for number, text in enumerate(lines, start=1):
            yield number, text.split("\t")
        return
    reader = csv.reader((text + "\n" for text in lines), strict=True)
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield start, f"bad CSV: {error}"
        else:
            yield start, cells
        start = reader.line_num + 1


def _columns(path: Path, header: Sequence[str]) -> dict[int, str]:
    """Column index -> accepted field name for the header's known columns; the rest is metadata.
    Raises EngineError without a Prompt column, with two columns for one field, or an img2img column."""
    columns: dict[int, str] = {}
    by_field: dict[str, str] = {}
    for i, cell in enumerate(header):
        name = re.sub(r"[\s-]+", "_", cell.strip().lower())
        name = "prompt" if name in PROMPT_COLUMNS else name
        if name in IMG2IMG_FIELDS:
            problem = "img2img is not supported by render"
            raise EngineError(f"jobs file {path}: column {cell.strip()!r}: {problem}")
        if name not in FIELDS:
            continue
        target = FIELDS[name]
        if target in by_field:
            raise EngineError(
                f"jobs file {path}: columns {by_field[target]!r} and {cell.strip()!r} both set {target}"
            )
        by_field[target] = cell.strip()
        columns[i] = name
    if "prompt" not in by_field:
        found = ", ".join(repr(cell.strip()) for cell in header)
        raise EngineError(f"jobs file {path}: no 'Prompt' column in its header (columns: {found})")
    return columns


# -- one row's fields ---------------------------------------------------------------------------


def _parse_row(index: int, line: int, data: Mapping[str, Any], from_text: bool) -> _Row:
    """A row from its raw fields (JSON values, or a table's non-empty cells as strings)."""
    row_id: str | None = None
    try:
        if "id" in data:
            row_id = _convert("id", data["id"], from_text)
        return _Row(index, line, row_id, _normalize(data, from_text))
    except RequestError as error:
        return _Row(index, line, row_id, None, _one_line(error))


def _normalize(data: Mapping[str, Any], from_text: bool) -> dict[str, Any]:
    """Canonical names and typed values; ``size`` becomes width and height. Raises RequestError."""
    own: dict[str, Any] = {}
    given: dict[str, str] = {}
    for name, value in data.items():
        if name in IMG2IMG_FIELDS:
            raise RequestError(f"{name!r}: img2img is not supported by render (txt2img only)")
        if name not in FIELDS:
            raise RequestError(f"unknown field {name!r}; valid fields: {', '.join(FIELDS)}")
        target = FIELDS[name]
        if target in given:
            raise RequestError(f"{given[target]!r} and {name!r} both set {target}")
        given[target] = name
        own[target] = _convert(target, value, from_text)
    if "prompt" not in own:
        raise RequestError("the row has no prompt")
    size = own.pop("size", None)
    if size is not None:
        if "width" in own or "height" in own:
            raise RequestError("give size or width and height, not both")
        own["width"], own["height"] = size
    return own


def _convert(name: str, value: Any, from_text: bool) -> Any:
    """One field's value, typed. Raises RequestError naming the field."""
    try:
        if from_text and name in (*_INTEGER, *_NUMBER, "seed"):
            value = _number_text(value, float if name in _NUMBER else int)
        return _CONVERTERS[name](value)
    except RequestError:
        raise
    except ValueError as error:
        raise RequestError(f"{name}: {error}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _prompt(value: Any) -> str:
    if not _text(value).strip():
        raise ValueError("must not be empty")
    return value


def _sampler_name(value: Any) -> str:
    """The canonical name: "euler a" and "Euler a" give equal keys."""
    name = _text(value)
    try:
        return resolve(name)
    except ValueError as error:
        raise RequestError(str(error)) from None


def _integer(value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _images(value: Any) -> int:
    if not (_is_int(value) and 1 <= value <= MAX_IMAGES):
        raise ValueError(f"images per seed must be an integer in 1..{MAX_IMAGES}, got {value!r}")
    return int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _seed_value(value: Any) -> int | None:
    """None for random (null or -1); the range is checked against n later."""
    if value is None or (_is_int(value) and value == -1):
        return None
    if not (_is_int(value) and 0 <= value <= MAX_SEED):
        raise ValueError(f"must be -1 (random) or an integer in 0..{MAX_SEED}, got {value!r}")
    return int(value)


def _size_value(value: Any) -> tuple[int, int]:
    return parse_size(_text(value))


def _id_value(value: Any) -> str:
    if _is_int(value):
        return str(value)
    if not (isinstance(value, str) and value.strip()):
        raise ValueError(f"must be a non-empty string or an integer, got {value!r}")
    return value.strip()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CONVERTERS = {
    "prompt": _prompt,
    "negative_prompt": _text,
    "sampler": _sampler_name,
    "steps": _integer,
    "width": _integer,
    "height": _integer,
    "clip_skip": _integer,
    "n": _images,
    "guidance_scale": _number,
    "guidance_rescale": _number,
    "seed": _seed_value,
    "size": _size_value,
    "id": _id_value,
}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
