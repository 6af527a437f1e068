"""Review a batch render at a glance: contact sheets (grid PNGs of captioned thumbnails) and a static
``index.html`` gallery (each image with its prompt, negative prompt, seed and settings).

Both are written atomically (:func:`engine.fsutil.write_atomic`) into OUT_DIR beside the images, and
rewritten whole after every run, so they always show the run as it stands. A thousands-image run is
split over several sheets (``contact-sheet-001.png``, ...) instead of one giant PNG; sheets left from an
earlier, bigger run are removed. A missing or unreadable PNG shows as a grey "missing" tile, never an
error. The gallery is self-contained (inline CSS, relative links, no network) and shows without
JavaScript; everything the user wrote is HTML-escaped. Torch-free: Pillow and the standard library.
"""

from __future__ import annotations

import html
import io
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from engine.fsutil import write_atomic

SHEET_STEM = "contact-sheet"
SHEET_PATTERN = re.compile(rf"{SHEET_STEM}(?:-\d{{3,}})?\.png")  # ours to replace or remove
GALLERY_NAME = "index.html"
PAD = 6  # px around and between tiles
CAPTION_LINES = 2  # "seed N", then the prompt, cut to the tile's width
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (236, 236, 236)
PLACEHOLDER = (158, 158, 158)
TEXT = (32, 32, 32)
ELLIPSIS = "..."
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
# The request's settings shown for each image, in A1111's infotext order and names.
_SHOWN = (("Steps", "steps"), ("Sampler", "sampler"), ("CFG scale", "guidance_scale"))


@dataclass(frozen=True)
class GalleryEntry:
    """One image of the render. ``file``: the PNG's name inside OUT_DIR. ``settings``: label -> value,
    shown as ``label: value`` (e.g. ``{"Steps": "8", "Sampler": "Euler a", "Size": "64x64"}``)."""

    file: str
    prompt: str
    negative_prompt: str
    seed: int
    settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_request(cls, file: str, row: str, image: int, request: Mapping[str, Any]) -> GalleryEntry:
        """From a one-image request's ``GenerationRequest.to_json()`` dict (prompts as 1-element lists),
        the row's label and the image's index in its row. Settings the request lacks are left out."""
        settings = {label: str(request[key]) for label, key in _SHOWN if request.get(key) is not None}
        if request.get("width") is not None and request.get("height") is not None:
            settings["Size"] = f"{request['width']}x{request['height']}"
        if int(request.get("clip_skip") or 1) > 1:
            settings["Clip skip"] = str(request["clip_skip"])
        if float(request.get("guidance_rescale") or 0.0) > 0.0:
            settings["CFG rescale"] = str(request["guidance_rescale"])
        if request.get("image") is not None and request.get("strength") is not None:
            settings["Denoising strength"] = str(request["strength"])
        settings["Row"] = str(row)
        settings["Image"] = str(image)
        prompt = _one_text(request.get("prompt", ""))
        return cls(
            file, prompt, _one_text(request.get("negative_prompt", "")), int(request["seed"]), settings
        )


def _one_text(value: Any) -> str:
    """A prompt from to_json's 1-element list (several are joined by newlines), or a plain string."""
    if isinstance(value, (list, tuple)):
        return "\n".join(str(part) for part in value)
    return "" if value is None else str(value)


# -- contact sheets ------------------------------------------------------------------------------


def sheet_names(count: int, per_sheet: int) -> list[str]:
    """The sheet file names for ``count`` entries: ``contact-sheet.png`` when one sheet holds them all,
    else ``contact-sheet-001.png``, ``-002``, ...; none for no entries. Raises ValueError if
    ``per_sheet`` < 1."""
    if per_sheet < 1:
        raise ValueError(f"per_sheet must be at least 1, got {per_sheet}")
    sheets = math.ceil(count / per_sheet)
    if sheets <= 1:
        return [f"{SHEET_STEM}.png"] * sheets
    return [f"{SHEET_STEM}-{number:03d}.png" for number in range(1, sheets + 1)]


def sheet_grid(count: int) -> tuple[int, int]:
    """(columns, rows) for ``count`` tiles: about square, columns = ceil(sqrt(count))."""
    columns = max(1, math.ceil(math.sqrt(count)))
    return columns, max(1, math.ceil(count / columns))


def write_contact_sheets(
    out_dir: Path, entries: Sequence[GalleryEntry], thumb: int = 128, per_sheet: int = 100
) -> list[Path]:
    """Write the contact sheets of ``entries`` (in order, ``per_sheet`` a sheet) into ``out_dir``.

    Each sheet is an RGB PNG grid of tiles ``thumb`` px square (the image scaled to fit, aspect kept)
    with two caption lines under each (seed; prompt, cut to fit). Sheets of ours (``contact-sheet.png``
    or ``contact-sheet-NNN.png``) not written this time are removed afterwards. Returns the sheets'
    paths. Raises ValueError if ``thumb`` or ``per_sheet`` < 1; OSError if ``out_dir`` is not writable.
    """
    if thumb < 1:
        raise ValueError(f"thumb must be at least 1 px, got {thumb}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sheet_names(len(entries), per_sheet)
    font = ImageFont.load_default()
    written = []
    for index, name in enumerate(names):
        page = entries[index * per_sheet : (index + 1) * per_sheet]
        encoded = io.BytesIO()
        render_sheet(out_dir, page, thumb, font).save(encoded, format="PNG", optimize=False)
        written.append(write_atomic(out_dir / name, encoded.getvalue()))
    _remove_stale_sheets(out_dir, keep=set(names))
    return written


def _remove_stale_sheets(out_dir: Path, keep: set[str]) -> None:
    """Remove our sheets (by name pattern) from an earlier run that are not in ``keep``."""
    for path in out_dir.iterdir():
        if SHEET_PATTERN.fullmatch(path.name) and path.name not in keep and path.is_file():
            path.unlink(missing_ok=True)


def render_sheet(out_dir: Path, entries: Sequence[GalleryEntry], thumb: int, font: Font) -> Image.Image:
    """One sheet: ``sheet_grid(len(entries))`` tiles, row by row; size
    (columns * (thumb + PAD) + PAD) x (rows * (thumb + caption + PAD) + PAD), caption =
    ``caption_height(font)``."""
    columns, rows = sheet_grid(len(entries))
    cell_height = thumb + caption_height(font)
    sheet = Image.new("RGB", (columns * (thumb + PAD) + PAD, rows * (cell_height + PAD) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, entry in enumerate(entries):
        left = PAD + (index % columns) * (thumb + PAD)
        top = PAD + (index // columns) * (cell_height + PAD)
        tile, found = _tile(out_dir / entry.file, thumb, font)
        sheet.paste(tile, (left, top))
        line_top = top + thumb + 1
        for line in caption_lines(entry, font, thumb, missing=not found):
            draw.text((left, line_top), line, fill=TEXT, font=font)
            line_top += line_height(font)
    return sheet


def _tile(path: Path, thumb: int, font: Font) -> tuple[Image.Image, bool]:
    """A ``thumb`` px square tile with the image scaled to fit and centred, and whether the image
    could be read; a grey "missing" tile when it could not (absent, not an image, truncated)."""
    tile = Image.new("RGB", (thumb, thumb), TILE_BACKGROUND)
    try:
        with Image.open(path) as image:
            image.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
            small = _rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        tile.paste(PLACEHOLDER, (0, 0, thumb, thumb))
        label = _drawable("missing", font)
        ImageDraw.Draw(tile).text((thumb // 2, thumb // 2), label, fill=BACKGROUND, font=font, anchor="mm")
        return tile, False
    tile.paste(small, ((thumb - small.width) // 2, (thumb - small.height) // 2))
    return tile, True


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency over the tile's background (as a viewer would show it)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, TILE_BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def line_height(font: Font) -> int:
    """Pixels a caption line takes (the font's ascent to descent, plus 1)."""
    return int(font.getbbox("Ag")[3]) + 1


def caption_height(font: Font) -> int:
    """Pixels under each tile for its caption."""
    return CAPTION_LINES * line_height(font) + 2


def caption_lines(entry: GalleryEntry, font: Font, width: int, missing: bool = False) -> list[str]:
    """The caption under a tile: ``seed N`` (``missing, seed N`` without an image), then the prompt on
    one line, each cut to ``width`` px with "...". Text the font cannot encode becomes ``?``."""
    first = f"missing, seed {entry.seed}" if missing else f"seed {entry.seed}"
    return [fit_text(first, font, width), fit_text(entry.prompt, font, width)]


def fit_text(text: str, font: Font, width: int) -> str:
    """``text`` on one line (whitespace runs and control characters as one space) and cut so it is
    at most ``width`` px wide in ``font``, ending in "..." when cut; drawable in ``font``."""
    flat = " ".join(_drawable(text, font).split())
    if font.getlength(flat) <= width:
        return flat
    low, high = 0, len(flat)  # the longest prefix that fits with the ellipsis: binary search
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(flat[:middle].rstrip() + ELLIPSIS) <= width:
            low = middle
        else:
            high = middle - 1
    return flat[:low].rstrip() + ELLIPSIS if low else ""


def _drawable(text: str, font: Font) -> str:
    """Control and format characters as spaces; for Pillow's bitmap font (latin-1 only) anything
    else outside latin-1 as ``?`` (FreeType draws a missing glyph's box itself)."""
    text = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in text)
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


# -- index.html ----------------------------------------------------------------------------------


def write_gallery(out_dir: Path, entries: Sequence[GalleryEntry], title: str = "sd-engine render") -> Path:
    """Write ``out_dir/index.html``: a header with counts (and links to the contact sheets present in
    ``out_dir``: write those first), then one card per entry, in order. Returns its path. Raises
    OSError if ``out_dir`` is not writable."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    present = [(out_dir / entry.file).is_file() for entry in entries]
    sheets = sorted(path.name for path in out_dir.iterdir() if SHEET_PATTERN.fullmatch(path.name))
    cards = "\n".join(
        _card(index, entry, found) for index, (entry, found) in enumerate(zip(entries, present, strict=True))
    )
    page = _PAGE.format(
        title=_escape(title),
        css=_CSS,
        counts=_escape(_counts(entries, present)),
        sheets=_sheet_links(sheets),
        cards=cards,
        script=_SCRIPT,
    )
    return write_atomic(out_dir / GALLERY_NAME, page)


def _escape(text: str) -> str:
    """HTML-escaped text (quotes too, for attributes); control characters HTML forbids (NUL and the
    like, not tab or line ends) as U+FFFD, so the page shows that something was there."""
    return html.escape(_CONTROL.sub("\ufffd", str(text)), quote=True)


def _href(file: str) -> str:
    """A relative URL for a file name (spaces, ``#``, ``%``, ``?`` and non-ASCII percent-encoded),
    escaped for an attribute."""
    return _escape(quote(file))


def _counts(entries: Sequence[GalleryEntry], present: Iterable[bool]) -> str:
    missing = sum(1 for found in present if not found)
    prompts = len({entry.prompt for entry in entries})
    parts = [_plural(len(entries), "image"), _plural(prompts, "prompt")]
    parts += [_plural(len({entry.seed for entry in entries}), "seed")]
    if missing:
        parts.append(f"{missing} missing")
    return " · ".join(parts)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _sheet_links(names: Sequence[str]) -> str:
    if not names:
        return ""
    links = " ".join(f'<a href="{_href(name)}">{_escape(name)}</a>' for name in names)
    return f'<p class="sheets">Contact sheets: {links}</p>'


def _card(index: int, entry: GalleryEntry, found: bool) -> str:
    """One image's card: the linked image (or a "missing" box), prompt, negative prompt, seed,
    settings and file name."""
    href = _href(entry.file)
    size = re.fullmatch(r"(\d+)x(\d+)", entry.settings.get("Size", ""))
    dims = f' width="{size.group(1)}" height="{size.group(2)}"' if size else ""
    picture = (
        f'<a href="{href}"><img src="{href}" alt="{_escape(entry.prompt)}" loading="lazy"'
        f' decoding="async"{dims}></a>'
        if found
        else '<div class="missing">missing</div>'
    )
    negative = (
        f'<p class="negative"><b>Negative prompt:</b> {_escape(entry.negative_prompt)}</p>'
        if entry.negative_prompt
        else ""
    )
    settings = "".join(
        f"<li><b>{_escape(key)}:</b> {_escape(value)}</li>" for key, value in entry.settings.items()
    )
    return (
        f'<article class="card" id="image-{index}">{picture}'
        f'<p class="prompt">{_escape(entry.prompt)}</p>{negative}'
        f'<ul class="settings"><li><b>Seed:</b> {entry.seed}</li>{settings}</ul>'
        f'<p class="file"><a href="{href}">{_escape(entry.file)}</a></p></article>'
    )


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #222; }
header { padding: 12px 16px; background: #fff; border-bottom: 1px solid #ddd; }
h1 { font-size: 20px; margin: 0 0 4px; }
header p { margin: 4px 0; }
#filter { margin-top: 6px; width: min(420px, 100%); padding: 4px 6px; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px;
  padding: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; overflow-wrap: anywhere; }
.card img { display: block; width: 100%; max-width: 512px; height: auto; background: #eee;
  image-rendering: auto; }
.missing { display: flex; align-items: center; justify-content: center; aspect-ratio: 1;
  background: #9e9e9e; color: #fff; }
.prompt { white-space: pre-wrap; font-weight: 600; margin: 6px 0 4px; }
.negative { white-space: pre-wrap; color: #933; margin: 0 0 4px; }
.settings { list-style: none; padding: 0; margin: 0; font-size: 12px; color: #555; }
.settings li { display: inline; margin-right: 8px; }
.file { font-size: 11px; color: #888; margin: 4px 0 0; }
.file a { color: inherit; }
[hidden] { display: none !important; }
"""

# Extras only (the page works without it): a filter box over the cards' text.
_SCRIPT = """
const box = document.getElementById("filter");
box.hidden = false;
box.addEventListener("input", () => {
  const needle = box.value.toLowerCase();
  for (const card of document.querySelectorAll(".card")) {
    card.hidden = needle !== "" && !card.textContent.toLowerCase().includes(needle);
  }
});
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="counts">{counts}</p>
{sheets}
<input type="search" id="filter" placeholder="Filter by prompt, seed or setting" aria-label="Filter" hidden>
</header>
<main>
{cards}
</main>
<script>{script}</script>
</body>
</html>
"""
