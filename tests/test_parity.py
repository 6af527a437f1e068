"""The one definition of rel L2, max-abs and PSNR, checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.parity import compare, max_abs, psnr, rel_l2
from engine.sizes import parse_size


def test_psnr_of_uint8_images_does_not_wrap() -> None:
    reference = np.array([[0, 255], [10, 20]], dtype=np.uint8)
    image = np.array([[2, 253], [10, 20]], dtype=np.uint8)  # uint8 subtraction would wrap to 254
    assert psnr(reference, image, peak=255) == pytest.approx(10 * math.log10(255**2 / 2.0))
    assert max_abs(reference, image) == 2.0
    assert psnr(reference, reference, peak=255) == math.inf


def test_rel_l2_and_non_finite_output() -> None:
    reference = np.array([3.0, 4.0])
    assert rel_l2(reference, np.array([3.0, 5.0])) == pytest.approx(1 / 5)
    assert rel_l2(reference, np.array([3.0, np.nan])) == math.inf
    assert rel_l2(np.zeros(2), np.zeros(2)) == 0.0


def test_compare_uses_the_reference_range_as_peak() -> None:
    rng = np.random.default_rng(11)
    expected = rng.standard_normal((2, 3, 5))
    actual = expected + 1e-3 * rng.standard_normal(expected.shape)
    report = compare(expected, actual, {"batch": 2})
    assert report.rel_l2 == rel_l2(expected, actual)
    assert report.psnr_db == psnr(expected, actual, peak=float(np.ptp(expected)))


@pytest.mark.parametrize(
    ("text", "square_ok", "size"),
    [("512x768", False, (512, 768)), (" 64 X 48 ", False, (64, 48)), ("256", True, (256, 256))],
)
def test_parse_size(text: str, square_ok: bool, size: tuple[int, int]) -> None:
    assert parse_size(text, square_ok=square_ok) == size


@pytest.mark.parametrize(("text", "square_ok"), [("256", False), ("64by64", True), ("", True), ("8x", False)])
def test_parse_size_rejects(text: str, square_ok: bool) -> None:
    with pytest.raises(ValueError, match=f"got {text!r}"):
        parse_size(text, square_ok=square_ok)
