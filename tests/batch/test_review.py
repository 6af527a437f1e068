"""Review output of a batch render: contact sheets read back pixel by pixel, and index.html loaded in
headless Chromium (Debian's /usr/bin/chromium driven by Playwright) with every image checked."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from engine.batch.review import (
    BACKGROUND,
    PAD,
    PLACEHOLDER,
    TILE_BACKGROUND,
    GalleryEntry,
    caption_height,
    caption_lines,
    fit_text,
    sheet_grid,
    write_contact_sheets,
    write_gallery,
)
from engine.pipeline.request import GenerationRequest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> "quotes" & \'apostrophes\''
NON_LATIN = "猫が月を見る, قطة تحت القمر, кошка 🐈\u200d⬛ e\u0301\tnew\nline\x00end"


def _request(prompt: str = "a cat", seed: int = 1, **settings: Any) -> dict[str, Any]:
    values = {"steps": 8, "width": 64, "height": 64, "sampler": "Euler a", "seed": seed, **settings}
    return GenerationRequest.create(prompt, "", **values).to_json()


def _entry(file: str, prompt: str = "a cat", seed: int = 1, negative: str = "") -> GalleryEntry:
    return GalleryEntry(file, prompt, negative, seed, {"Steps": "8", "Size": "64x64"})


def _solid(path: Path, color: Sequence[int], size: tuple[int, int] = (48, 48)) -> Path:
    Image.new("RGB", size, tuple(int(c) for c in color)).save(path)
    return path


def _noise(path: Path, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Path:
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _colors(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """Random mid-range colours: far from the white background, the tile grey and the text."""
    return [tuple(int(c) for c in rng.integers(60, 200, 3)) for _ in range(count)]


def _tile_origin(index: int, columns: int, thumb: int, caption: int) -> tuple[int, int]:
    return PAD + (index % columns) * (thumb + PAD), PAD + (index // columns) * (thumb + caption + PAD)


def _close(pixel: Sequence[int], color: Sequence[int], tolerance: int = 2) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, color, strict=True))


def _hidden_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# -- entries -------------------------------------------------------------------------------------


def test_entry_from_a_one_image_request() -> None:
    entry = GalleryEntry.from_request("00003-000-a-cat-s7.png", "00003", 0, _request(seed=7))
    assert entry == GalleryEntry(
        "00003-000-a-cat-s7.png",
        "a cat",
        "",
        7,
        {
            "Steps": "8",
            "Sampler": "Euler a",
            "CFG scale": "7.5",
            "Size": "64x64",
            "Row": "00003",
            "Image": "0",
        },
    )
    extra = GalleryEntry.from_request("f.png", "id-x", 2, _request("a dog", 3, clip_skip=2, width=128))
    assert extra.settings["Clip skip"] == "2" and extra.settings["Size"] == "128x64"
    assert (extra.prompt, extra.settings["Image"]) == ("a dog", "2")


# -- contact sheets ------------------------------------------------------------------------------


def test_one_sheet_is_a_grid_of_thumbnails(tmp_path: Path, rng: np.random.Generator) -> None:
    colors = _colors(rng, 5)
    entries = [_entry(_solid(tmp_path / f"{i}.png", c).name, seed=i) for i, c in enumerate(colors)]
    thumb = 32
    (sheet_path,) = write_contact_sheets(tmp_path, entries, thumb=thumb)
    assert sheet_path == tmp_path / "contact-sheet.png"
    columns, rows = sheet_grid(5)
    assert (columns, rows) == (3, 2)
    caption = caption_height(ImageFont.load_default())
    with Image.open(sheet_path) as sheet:
        assert sheet.mode == "RGB"
        assert sheet.size == (PAD + columns * (thumb + PAD), PAD + rows * (thumb + caption + PAD))
        for index, color in enumerate(colors):  # 48 px scaled to 32: the whole tile is the image
            left, top = _tile_origin(index, columns, thumb, caption)
            for x, y in ((1, 1), (thumb // 2, thumb // 2), (thumb - 2, thumb - 2)):
                assert _close(sheet.getpixel((left + x, top + y)), color), (index, x, y)
            text = sheet.crop((left, top + thumb, left + thumb, top + thumb + caption))
            assert text.convert("L").getextrema()[0] < 128, f"no caption drawn under tile {index}"
        left, top = _tile_origin(5, columns, thumb, caption)  # the grid's unused sixth cell
        assert sheet.getpixel((left + thumb // 2, top + thumb // 2)) == BACKGROUND
    assert _hidden_files(tmp_path) == []


def test_thumbnails_keep_their_aspect(tmp_path: Path, rng: np.random.Generator) -> None:
    (color,) = _colors(rng, 1)
    entries = [_entry(_solid(tmp_path / "wide.png", color, size=(64, 32)).name)]
    (sheet_path,) = write_contact_sheets(tmp_path, entries, thumb=32)
    with Image.open(sheet_path) as sheet:
        column = [sheet.getpixel((PAD + 16, PAD + y)) for y in range(32)]
    assert all(pixel == TILE_BACKGROUND for pixel in column[:7] + column[25:])  # 32x16, centred
    assert all(_close(pixel, color) for pixel in column[9:23])


def test_many_entries_make_several_sheets_and_stale_ones_go(tmp_path: Path, rng: np.random.Generator) -> None:
    colors = _colors(rng, 7)
    entries = [_entry(_solid(tmp_path / f"{i}.png", c).name, seed=i) for i, c in enumerate(colors)]
    keep = [tmp_path / "contact-sheet-notes.png", tmp_path / "my-contact-sheet-001.png"]
    for path in keep:
        _solid(path, (0, 0, 0), size=(4, 4))
    paths = write_contact_sheets(tmp_path, entries, thumb=16, per_sheet=3)
    assert [path.name for path in paths] == [f"contact-sheet-00{n}.png" for n in (1, 2, 3)]
    caption = caption_height(ImageFont.load_default())
    for path, count, page_colors in zip(paths, (3, 3, 1), (colors[:3], colors[3:6], colors[6:]), strict=True):
        columns, rows = sheet_grid(count)
        with Image.open(path) as sheet:
            assert sheet.size == (PAD + columns * (16 + PAD), PAD + rows * (16 + caption + PAD))
            for index, color in enumerate(page_colors):
                left, top = _tile_origin(index, columns, 16, caption)
                assert _close(sheet.getpixel((left + 8, top + 8)), color)

    (single,) = write_contact_sheets(tmp_path, entries[:2], thumb=16, per_sheet=3)
    assert single == tmp_path / "contact-sheet.png"
    assert not any(path.exists() for path in paths)
    assert write_contact_sheets(tmp_path, [], per_sheet=3) == []
    assert not single.exists()
    assert all(path.exists() for path in keep)
    assert _hidden_files(tmp_path) == []


def test_missing_or_unreadable_images_get_a_placeholder(tmp_path: Path, rng: np.random.Generator) -> None:
    (color,) = _colors(rng, 1)
    _solid(tmp_path / "good.png", color)
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, format="PNG")
    (tmp_path / "truncated.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (tmp_path / "folder.png").mkdir()
    names = ["good.png", "gone.png", "garbage.png", "truncated.png", "folder.png"]
    (sheet_path,) = write_contact_sheets(
        tmp_path, [_entry(name, seed=i) for i, name in enumerate(names)], thumb=32
    )
    columns, _ = sheet_grid(len(names))
    caption = caption_height(ImageFont.load_default())
    with Image.open(sheet_path) as sheet:
        for index, name in enumerate(names):
            left, top = _tile_origin(index, columns, 32, caption)
            expected = color if name == "good.png" else PLACEHOLDER
            assert _close(sheet.getpixel((left + 1, top + 1)), expected), name
    font = ImageFont.load_default()
    assert caption_lines(_entry("gone.png", seed=9), font, 128, missing=True)[0] == "missing, seed 9"


def test_captions_take_any_text(tmp_path: Path, rng: np.random.Generator) -> None:
    prompts = [NON_LATIN, HOSTILE, "", "a very long prompt " * 20]
    entries = [_entry(_noise(tmp_path / f"{i}.png", rng).name, p, i) for i, p in enumerate(prompts)]
    (sheet_path,) = write_contact_sheets(tmp_path, entries, thumb=64)
    with Image.open(sheet_path) as sheet:
        sheet.load()
    fonts = [ImageFont.load_default()]
    if hasattr(ImageFont, "load_default_imagefont"):  # Pillow's latin-1 bitmap font (Pillow >= 10.1)
        fonts.append(ImageFont.load_default_imagefont())
    for font in fonts:
        canvas = ImageDraw.Draw(Image.new("RGB", (200, 40)))
        for prompt in prompts:
            line = fit_text(prompt, font, 64)
            assert font.getlength(line) <= 64 and "\n" not in line and "\x00" not in line
            canvas.text((0, 0), line, font=font, fill=(0, 0, 0))
        assert fit_text("a very long prompt " * 20, font, 64).endswith("...")
        assert fit_text("short", font, 200) == "short"


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_sheet"):
        write_contact_sheets(tmp_path, [_entry("a.png")], per_sheet=0)
    with pytest.raises(ValueError, match="thumb"):
        write_contact_sheets(tmp_path, [_entry("a.png")], thumb=0)


# -- index.html without a browser ----------------------------------------------------------------


class _Page(HTMLParser):
    """The tags and text of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for name, _ in self.tags if name == tag)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_gallery_escapes_everything_the_user_wrote(tmp_path: Path, rng: np.random.Generator) -> None:
    files = [_noise(tmp_path / name, rng).name for name in ("a.png", 'q"<b>&.png')]
    entries = [_entry(files[0], HOSTILE, 1, negative=HOSTILE), _entry(files[1], NON_LATIN, 2)]
    path = write_gallery(tmp_path, entries, title="<i>run</i> & co")
    text = path.read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in text and "<script>window" not in text
    page = _parse(path)
    assert page.count("img") == 2 and page.count("script") == 1 and page.count("i") == 0
    assert sum(HOSTILE in chunk for chunk in page.text) >= 2  # prompt and negative prompt, as text
    assert any(NON_LATIN.replace("\x00", "\ufffd") in chunk for chunk in page.text)
    assert "<i>run</i> & co" in page.text
    sources = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert [unquote(source or "") for source in sources] == files
    assert all(attrs.get("loading") == "lazy" for tag, attrs in page.tags if tag == "img")
    assert "http" not in text.replace('name="viewport"', "")  # nothing fetched from the network
    assert _hidden_files(tmp_path) == []


def test_gallery_marks_missing_images(tmp_path: Path, rng: np.random.Generator) -> None:
    _noise(tmp_path / "here.png", rng)
    path = write_gallery(tmp_path, [_entry("here.png", seed=1), _entry("gone.png", seed=2)])
    page = _parse(path)
    assert page.count("img") == 1 and page.count("article") == 2
    assert "2 images · 1 prompt · 2 seeds · 1 missing" in page.text


# -- index.html in headless Chromium --------------------------------------------------------------


# Resolves once every <img> has loaded or failed (complete); a lazy one must have been scrolled to.
_SETTLED = """() => Promise.all([...document.images].map(i => i.complete ? null : new Promise(done => {
  i.addEventListener("load", done); i.addEventListener("error", done);
})))"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, launched once for this module; skipped where it or Playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package: chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing (pip install playwright)"
    )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def test_gallery_loads_every_image_in_chromium(
    browser: Any, tmp_path: Path, rng: np.random.Generator
) -> None:
    names = ["plain.png", "with space #1 100%.png", "ünïcödé 猫 ?x&y=1.png", "row-00002-000-a-cat-s5.png"]
    sizes = [(48, 40), (40, 48), (32, 32), (56, 24)]
    for name, size in zip(names, sizes, strict=True):
        _noise(tmp_path / name, rng, size)
    prompts = ["a cat", HOSTILE, NON_LATIN, "a dog\non two lines"]
    entries = [
        _entry(name, prompt, i, negative=HOSTILE)
        for i, (name, prompt) in enumerate(zip(names, prompts, strict=True))
    ]
    write_contact_sheets(tmp_path, entries, thumb=32)
    gallery = write_gallery(tmp_path, entries)

    page = browser.new_page()
    page.set_default_timeout(10_000)
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(gallery.as_uri(), wait_until="load")
    for image in page.locator("img").all():  # loading="lazy": show each as a reader scrolling would
        image.scroll_into_view_if_needed()
    page.evaluate(_SETTLED)  # every image loaded or failed
    broken = page.evaluate(
        "() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    )
    assert broken == [] and page.locator("img").count() == len(entries)
    loaded = page.evaluate("() => [...document.images].map(i => [i.naturalWidth, i.naturalHeight])")
    assert [tuple(size) for size in loaded] == sizes
    assert page.evaluate("() => window.__xss") is None and errors == []
    assert page.locator("script").count() == 1
    shown = [prompt.replace("\x00", "\ufffd") for prompt in prompts]  # HTML has no NUL: shown as U+FFFD
    assert page.locator(".prompt").all_inner_texts() == shown
    assert page.locator(".negative").first.inner_text() == f"Negative prompt: {HOSTILE}"
    assert all(url.startswith("file://") for url in requests), requests
    assert page.locator(".counts").inner_text() == "4 images · 4 prompts · 4 seeds"

    page.fill("#filter", "two lines")  # the inline script's extra: filter cards by their text
    assert page.locator(".card:visible").count() == 1
    sheet = page.locator(".sheets a").first.get_attribute("href")
    assert sheet == "contact-sheet.png" and (tmp_path / sheet).is_file()
    page.close()
