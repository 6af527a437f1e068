"""Init images as a viewer shows them, and every unreadable image as one line (issue 11, 5c and 5d).

Expected pixels come from the standards, written out in NumPy (the EXIF orientation table, alpha over
white, the CMYK / YCbCr / HSV formulas, 16-bit and float scaling), and from diffusers' ``load_image``
where it is right (EXIF orientation, opaque 8-bit modes); never from the loader under test.
"""

from __future__ import annotations

import base64
import colorsys
import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from diffusers.utils import load_image as diffusers_load_image
from PIL import Image, ImageCms

from engine.cli import main
from engine.errors import RequestError
from engine.pipeline import GenerationRequest
from engine.pipeline.images import BACKGROUND, MAX_IMAGE_PIXELS, load_image

ORIENTATION = 0x0112  # the EXIF tag
SIZE = (7, 5)  # width, height of the mode samples

# The picture a viewer shows for pixels stored with EXIF orientation n (EXIF 2.3, tag 274, says where
# row 0 and column 0 of the stored pixels go).
SHOWN: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda x: x,
    2: lambda x: x[:, ::-1],  # row 0 top, column 0 right: mirrored
    3: lambda x: x[::-1, ::-1],  # row 0 bottom, column 0 right: upside down
    4: lambda x: x[::-1],  # row 0 bottom, column 0 left
    5: lambda x: x.transpose(1, 0, 2),  # row 0 left, column 0 top
    6: lambda x: np.rot90(x, -1),  # row 0 right, column 0 top: a phone held upright
    7: lambda x: np.rot90(x, -1)[::-1],  # row 0 right, column 0 bottom
    8: lambda x: np.rot90(x, 1),  # row 0 left, column 0 bottom
}
# How to store a picture so that orientation n shows it upright: each undoes SHOWN[n].
STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    **SHOWN,
    6: lambda x: np.rot90(x, 1),
    8: lambda x: np.rot90(x, -1),
}


# What a header over Pillow's own hard limit (20000x20000) reports: the claimed size and our limit.
HEADER_CLAIM = "its header claims 400,000,000 pixels, over the limit of 67,108,864 pixels"


def _save(image: Image.Image, path: Path, orientation: int | None = None, **options: object) -> Path:
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif
    image.save(path, **options)
    return path


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over the white background, rounded."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb * a + np.array(BACKGROUND) * (1 - a))


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, np.float64)[..., None], 3, -1)


def _raw(mode: str, array: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, SIZE, np.ascontiguousarray(array).tobytes())


# -- EXIF orientation -----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_gives_the_picture_a_viewer_shows(
    tmp_path: Path, rng: np.random.Generator, orientation: int
) -> None:
    blocks = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)  # 8x8 blocks: JPEG keeps them closely
    picture = np.kron(blocks, np.ones((8, 8, 1), np.uint8))  # 24 x 40, wider than tall: a turn shows
    stored = np.ascontiguousarray(STORED[orientation](picture))
    assert np.array_equal(SHOWN[orientation](stored), picture)  # the two tables agree
    png = _save(Image.fromarray(stored), tmp_path / "photo.png", orientation)
    assert np.array_equal(_rgb(load_image(png)), picture)
    assert np.array_equal(np.asarray(diffusers_load_image(str(png))), picture)
    with Image.open(png) as opened:  # a request's PIL image is read the same way, and left as it was
        assert np.array_equal(GenerationRequest.create("a", image=opened).image, picture)
        assert opened.size == stored.shape[1::-1]
    jpeg = _save(Image.fromarray(stored), tmp_path / "photo.jpg", orientation, quality=95, subsampling=0)
    ours = _rgb(load_image(jpeg))
    assert np.array_equal(ours, np.asarray(diffusers_load_image(str(jpeg))))
    assert ours.shape == picture.shape
    assert np.abs(ours.astype(int) - picture).mean() < 4  # JPEG's loss, not a flip or a turn


def test_a_json_request_image_is_read_upright(tmp_path: Path, rng: np.random.Generator) -> None:
    picture = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = _save(Image.fromarray(np.ascontiguousarray(STORED[6](picture))), tmp_path / "p.png", 6)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    request = GenerationRequest.from_json({"prompt": "a", "image": data})
    assert request.image is not None and np.array_equal(request.image, picture)


def test_img2img_from_a_sideways_phone_jpeg_matches_diffusers(
    tiny_engine: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The reported case: a JPEG with Orientation 6 through img2img against diffusers' pipeline fed by
    its load_image (34.7 dB before the engine applied the orientation)."""
    from engine import Pipeline
    from tests.reference import diffusers_pipeline, generators, psnr

    rng = np.random.default_rng(6)
    blocks = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)  # stored 80 wide, 64 high: shown 64 x 80
    stored = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
    jpeg = _save(Image.fromarray(stored), tmp_path / "phone.jpg", 6, quality=95)
    with Image.open(jpeg) as opened:
        ours = Pipeline.load(tiny_engine).generate(
            "a red barn", image=opened, steps=4, width=64, height=80, sampler="Euler", seed=3, strength=0.6
        )
    ref = diffusers_pipeline(tiny_model, "Euler", img2img=True)(
        "a red barn", image=diffusers_load_image(str(jpeg)), strength=0.6, num_inference_steps=4,
        generator=generators(3, 1), output_type="np",
    ).images  # fmt: skip
    assert ref[0].shape == (80, 64, 3)
    assert psnr(ours.images[0], ref[0]) >= 40


# -- modes ----------------------------------------------------------------------------------------


def _palette(rng: np.random.Generator, transparency: bytes | int | None) -> tuple[Image.Image, np.ndarray]:
    palette = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    index = rng.integers(0, 6, SIZE[::-1], dtype=np.uint8)
    image = _raw("P", index)
    image.putpalette(palette.tobytes())
    alphas = np.full(6, 255, np.uint8)
    if isinstance(transparency, bytes):  # PNG tRNS: an alpha per palette entry
        alphas[: len(transparency)] = np.frombuffer(transparency, np.uint8)
    elif transparency is not None:  # GIF: one transparent index
        alphas[transparency] = 0
    if transparency is not None:
        image.info["transparency"] = transparency
    return image, _over_white(palette[index], alphas[index])


def _mode_cases(rng: np.random.Generator) -> dict[str, tuple[Image.Image, np.ndarray, int]]:
    """case -> (image, the RGB a viewer shows, tolerance in levels)."""
    shape = SIZE[::-1]
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    alpha = rng.integers(0, 256, shape, dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    premultiplied = np.round(rgb * (alpha[..., None] / 255)).astype(np.uint8)
    bits = rng.integers(0, 2, shape).astype(np.uint8) * 255
    cmyk = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    ink = cmyk / 255
    ycc = rng.integers(0, 256, (*shape, 3), dtype=np.uint8).astype(np.float64)
    luma, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    ycc_rgb = np.stack([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb], -1)
    hsv = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    hsv_rgb = np.array([[colorsys.hsv_to_rgb(*(pixel / 255)) for pixel in row] for row in hsv]) * 255
    wide = rng.integers(0, 65536, shape).astype(np.uint16)
    wide[0, :4] = (0, 65535, 128, 129)  # 128 / 257 rounds down, 129 / 257 up
    unit = rng.random(shape, dtype=np.float32)
    unit[0, :2] = (0, 1)
    keyed = _raw("L", grey)
    keyed.info["transparency"] = int(grey[1, 1])
    entries = rng.integers(0, 35, shape, dtype=np.uint8)  # PA: an index into the 35 colours of rgb, and alpha
    palette_alpha = _raw("PA", np.dstack([entries, alpha]))
    palette_alpha.putpalette(rgb.tobytes())
    scaled = _grey3(np.round(wide / 257))
    return {
        "1": (_raw("L", bits).convert("1"), _grey3(bits), 0),
        "L": (_raw("L", grey), _grey3(grey), 0),
        "L, a transparent grey": (keyed, np.where(grey[..., None] == grey[1, 1], 255, _grey3(grey)), 0),
        "LA": (_raw("LA", np.dstack([grey, alpha])), _over_white(_grey3(grey), alpha), 0),
        "La": (
            _raw("La", np.dstack([np.round(grey * (alpha / 255)).astype(np.uint8), alpha])),
            _over_white(_grey3(grey), alpha),
            1,
        ),
        "P": (*_palette(rng, None), 0),
        "P, a transparent index": (*_palette(rng, 2), 0),
        "P, palette alpha": (*_palette(rng, bytes([0, 128, 255, 7])), 0),
        "PA": (palette_alpha, _over_white(rgb.reshape(-1, 3)[entries], alpha), 0),
        "RGB": (_raw("RGB", rgb), rgb, 0),
        "RGB, a transparent colour": (
            _rgb_keyed(rgb),
            np.where((rgb == rgb[2, 3]).all(-1)[..., None], 255, rgb),
            0,
        ),
        "RGBA": (_raw("RGBA", np.dstack([rgb, alpha])), _over_white(rgb, alpha), 0),
        "RGBa": (_raw("RGBa", np.dstack([premultiplied, alpha])), _over_white(rgb, alpha), 1),
        "RGBX": (_raw("RGBX", np.dstack([rgb, alpha])), rgb, 0),
        "CMYK": (_raw("CMYK", cmyk), np.round(255 * (1 - ink[..., :3]) * (1 - ink[..., 3:])), 0),
        "YCbCr": (_raw("YCbCr", ycc.astype(np.uint8)), np.clip(np.round(ycc_rgb), 0, 255), 1),
        "HSV": (_raw("HSV", hsv), np.round(hsv_rgb), 0),
        "I;16": (_raw("I;16", wide.astype("<u2")), scaled, 0),
        "I;16L": (_raw("I;16L", wide.astype("<u2")), scaled, 0),
        "I;16B": (_raw("I;16B", wide.astype(">u2")), scaled, 0),
        "I;16N": (_raw("I;16N", wide), scaled, 0),
        "I": (_raw("I", wide.astype(np.int32)), scaled, 0),
        "F": (_raw("F", unit), _grey3(np.round(unit * 255.0)), 0),
        "LAB": (_to_lab(rgb), _from_lab(_to_lab(rgb)), 0),  # the ICC transform (littlecms) is the standard
    }


def _rgb_keyed(rgb: np.ndarray) -> Image.Image:
    image = _raw("RGB", rgb)
    image.info["transparency"] = tuple(int(v) for v in rgb[2, 3])
    return image


def _to_lab(rgb: np.ndarray) -> Image.Image:
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    return ImageCms.applyTransform(_raw("RGB", rgb), ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))


def _from_lab(image: Image.Image) -> np.ndarray:
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    return np.asarray(ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB")))


CASES = list(_mode_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("case", CASES)
def test_each_mode_maps_to_the_rgb_a_viewer_shows(rng: np.random.Generator, case: str) -> None:
    image, expected, tolerance = _mode_cases(rng)[case]
    before = image.tobytes()
    got = _rgb(load_image(image)).astype(np.int64)
    assert got.shape == (*SIZE[::-1], 3)
    assert np.abs(got - expected).max() <= tolerance, case
    assert image.tobytes() == before  # the caller's image is not changed


def test_every_mode_pillow_has_is_covered() -> None:
    covered = {case.split(",")[0] for case in CASES}
    assert covered == set(Image.MODES)


@pytest.mark.parametrize("case", ["1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"])
def test_opaque_8_bit_modes_match_diffusers(rng: np.random.Generator, case: str) -> None:
    image = _mode_cases(rng)[case][0]
    assert np.array_equal(_rgb(load_image(image)), np.asarray(diffusers_load_image(image)))


def test_16_bit_pixels_are_scaled_where_diffusers_clips(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    ours = _rgb(load_image(path))[..., 0]
    assert np.array_equal(ours, np.round(ramp / 257))
    clipped = np.asarray(diffusers_load_image(str(path)))[..., 0]
    assert (clipped == 255).mean() > 0.99  # Pillow's convert: every value above 255 is white


# Saved through real files (the formats that keep each mode), read back in that mode.
FILES = [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("LA", "TIFF"), ("P", "PNG"), ("P, palette alpha", "PNG"),
    ("P, a transparent index", "GIF"), ("L, a transparent grey", "PNG"), ("RGBA", "PNG"), ("RGBA", "TIFF"),
    ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF"), ("I;16", "PNG"), ("I;16", "TIFF"),
    ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "file_format"), FILES)
def test_modes_read_from_files(tmp_path: Path, rng: np.random.Generator, case: str, file_format: str) -> None:
    image, expected, tolerance = _mode_cases(rng)[case]
    path = tmp_path / f"image.{file_format.lower()}"
    image.save(path, file_format)
    with Image.open(path) as opened:
        assert opened.mode == image.mode
    got = _rgb(load_image(path)).astype(np.int64)
    assert np.abs(got - expected).max() <= tolerance


@pytest.mark.parametrize(
    ("mode", "values", "needle"),
    [
        ("F", [0.0, 1.5], "0..1, this one holds 0..1.5"),
        ("F", [-0.25, 1.0], "0..1, this one holds -0.25..1"),
        ("F", [0.0, np.nan], "NaN or inf"),
        ("F", [np.inf, 0.5], "NaN or inf"),
        ("I", [-1, 100], "0..65535, this one holds -1..100"),
        ("I", [0, 70000], "0..65535, this one holds 0..70000"),
    ],
)
def test_values_outside_a_mode_range_are_refused_in_one_line(mode: str, values: list, needle: str) -> None:
    dtype = np.float32 if mode == "F" else np.int32
    image = Image.frombytes(mode, (2, 1), np.array(values, dtype).tobytes())
    with pytest.raises(RequestError) as error:
        load_image(image)
    assert needle in str(error.value) and "\n" not in str(error.value)


# -- unreadable images ----------------------------------------------------------------------------


def _png_header_only(width: int, height: int, size: int = 138) -> bytes:
    """A PNG whose header claims width x height RGB pixels, padded with a text chunk to ``size`` bytes:
    the decompression bomb of the report (Pillow reads the size before any pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    padding = size - len(head) - len(tail) - 12 - len(b"Comment\x00")
    return head + chunk(b"tEXt", b"Comment\x00" + b"x" * padding) + tail


def _encoded(file_format: str, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(buffer, file_format)
    return buffer.getvalue()


def test_the_138_byte_decompression_bomb_is_one_line(tmp_path: Path) -> None:
    bomb = _png_header_only(20000, 20000)
    assert len(bomb) == 138
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    for source in (bomb, path, str(path)):
        with pytest.raises(
            RequestError,
            match=r"^cannot read image .*: " + HEADER_CLAIM,
        ):
            load_image(source)


def test_the_pixel_limit_is_checked_before_decoding_without_warnings() -> None:
    over_ours = _png_header_only(9000, 8000)  # under Pillow's own bomb error, over our limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            RequestError, match=r"9000x8000 is 72,000,000 pixels, over the limit of 67,108,864"
        ):
            load_image(over_ours)
    assert MAX_IMAGE_PIXELS == 2**26
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, "PNG")
    with pytest.raises(RequestError, match=r"64x48 is 3,072 pixels, over the limit of 3,071"):
        load_image(png.getvalue(), max_pixels=64 * 48 - 1)
    assert load_image(png.getvalue(), max_pixels=64 * 48).size == (64, 48)


@pytest.mark.parametrize("file_format", ["PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP"])
def test_truncated_images_are_one_line(rng: np.random.Generator, file_format: str) -> None:
    data = _encoded(file_format, rng)
    for keep in (0.1, 0.5, 0.9):
        with pytest.raises(RequestError, match=r"^cannot read image \(") as error:
            load_image(data[: int(len(data) * keep)])
        assert "\n" not in str(error.value)


def _unreadable(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what its error line says)."""
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    (tmp_path / "folder.png").mkdir()
    data = _encoded("JPEG", np.random.default_rng(1))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "page.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EOF\n")
    return {
        "not an image": (tmp_path / "notes.png", "not an image file Pillow can read"),
        "empty": (tmp_path / "empty.png", "the file is empty"),
        "bomb": (tmp_path / "bomb.png", "over the limit of 67,108,864 pixels"),
        "folder": (tmp_path / "folder.png", "is a folder"),
        "missing": (tmp_path / "nope.png", "not found"),
        "truncated": (tmp_path / "cut.jpg", "cannot read"),
        "postscript": (tmp_path / "page.eps", "EPS images are refused (Pillow runs Ghostscript"),
    }


@pytest.mark.parametrize(
    "case", ["not an image", "empty", "bomb", "folder", "missing", "truncated", "postscript"]
)
def test_every_unreadable_file_is_one_request_error(tmp_path: Path, case: str) -> None:
    path, needle = _unreadable(tmp_path)[case]
    with pytest.raises(RequestError) as error:
        load_image(path, label="init image")
    message = str(error.value)
    assert needle in message and str(path) in message and "init image" in message and "\n" not in message


def test_bad_bytes_and_sources_are_request_errors() -> None:
    for source, needle in [(b"", "no data"), (b"GIF89a", r"cannot read image \(6 bytes\)"), (3, "got int")]:
        with pytest.raises(RequestError, match=needle):
            load_image(source)  # type: ignore[arg-type]
    bomb = base64.b64encode(_png_header_only(20000, 20000)).decode("ascii")
    with pytest.raises(
        RequestError,
        match=r"^cannot read image \(138 bytes\): " + HEADER_CLAIM,
    ):
        GenerationRequest.from_json({"prompt": "a", "image": bomb})


@pytest.mark.parametrize(
    "case", ["not an image", "empty", "bomb", "folder", "missing", "truncated", "postscript"]
)
def test_the_cli_says_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tiny_engine: Path, tmp_path: Path, case: str
) -> None:
    path, needle = _unreadable(tmp_path)[case]
    out = tmp_path / "out.png"
    code = main(["generate", str(tiny_engine), "a cat", "--init-image", str(path), "-o", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code != 0 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("sd-engine: error: ") and "init image" in lines[0] and needle in lines[0]
    assert not out.exists()


def test_the_cli_reads_a_sideways_jpeg_upright(
    capsys: pytest.CaptureFixture[str], tiny_engine: Path, tmp_path: Path
) -> None:
    picture = np.kron(
        np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)
    )
    upright = _save(Image.fromarray(picture), tmp_path / "upright.png")
    sideways = _save(Image.fromarray(np.ascontiguousarray(STORED[6](picture))), tmp_path / "sideways.png", 6)
    outputs = []
    for init in (upright, sideways):
        out = tmp_path / f"out-{init.stem}.png"
        args = ["a cat", "--init-image", str(init), "--steps", "2", "--strength", "0.5", "--seed", "4"]
        assert main(["generate", str(tiny_engine), *args, "--size", "64x48", "-o", str(out)]) == 0
        with Image.open(out) as written:
            outputs.append(np.asarray(written))
    capsys.readouterr()
    assert np.array_equal(outputs[0], outputs[1])
