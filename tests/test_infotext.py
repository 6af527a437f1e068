"""A1111 infotext: exact strings A1111 writes, its parser's reading, and the PNG chunk tools read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.infotext import format_infotext, parse_infotext, quote, save_png, to_parameters, unquote


def _params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "steps": 20,
        "sampler": "Euler a",
        "guidance_scale": 7.5,
        "seed": 42,
        "width": 512,
        "height": 512,
        "model_hash": "abcdef1234",
        "model_name": "sd15",
        "vae_hash": None,
        "vae_name": None,
        "batch_size": 1,
        "batch_pos": 0,
        "strength": None,
        "clip_skip": 1,
        "prediction_type": "epsilon",
        "lora_hashes": None,
    }
    params.update(overrides)
    return params


def _image(width: int = 16, height: int = 8) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 30, 90))


def test_txt2img_exact_a1111_string() -> None:
    assert format_infotext(_params()) == (
        "a lighthouse at dusk\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, "
        "Model hash: abcdef1234, Model: sd15"
    )


def test_no_negative_line_when_empty_and_optional_fields_in_a1111_order() -> None:
    params = _params(
        prompt="a cat",
        negative_prompt="",
        sampler="DPM++ 2M Karras",
        guidance_scale=7.0,
        seed=43,
        width=640,
        height=448,
        model_name="my, model",
        batch_size=2,
        batch_pos=1,
        strength=0.75,
        clip_skip=2,
    )
    assert format_infotext(params) == (
        "a cat\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 43, Size: 640x448, "
        'Model hash: abcdef1234, Model: "my, model", Batch size: 2, Batch pos: 1, '
        "Denoising strength: 0.75, Clip skip: 2"
    )


def test_swapped_vae_and_v_prediction_follow_model_as_a1111_writes_them() -> None:
    params = _params(
        vae_hash="735e4c3a44", vae_name="vae-ft-mse-840000-ema-pruned", prediction_type="v_prediction"
    )
    assert format_infotext(params).endswith(
        "Model hash: abcdef1234, Model: sd15, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned, "
        "Prediction type: v_prediction"
    )


def test_missing_hash_and_model_are_left_out() -> None:
    text = format_infotext(_params(model_hash=None, model_name="", negative_prompt=""))
    assert text == (
        "a lighthouse at dusk\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512"
    )


@pytest.mark.parametrize(
    ("value", "quoted"),
    [("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"'), ('say "hi", x', '"say \\"hi\\", x"')],
)
def test_quote_like_a1111(value: str, quoted: str) -> None:
    assert quote(value) == quoted
    assert unquote(quoted) == value


def test_parses_an_infotext_written_by_a1111() -> None:
    # From A1111's own parse_generation_parameters docstring, plus fields a recent A1111 writes.
    text = (
        "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), detailed\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, "
        'Lora hashes: "detail: 1a2b3c, style: 4d5e6f", Version: v1.6.0'
    )
    fields = parse_infotext(text)
    assert fields == {
        "Prompt": "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), detailed",
        "Negative prompt": "ugly, fat, (((deformed))), [blurry]",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
        "Lora hashes": "detail: 1a2b3c, style: 4d5e6f",
        "Version": "v1.6.0",
    }
    params = to_parameters(fields)
    picked = (params["width"], params["height"], params["guidance_scale"], params["steps"])
    assert picked == (512, 512, 7.0, 20)


def test_last_line_with_fewer_than_three_pairs_is_prompt() -> None:
    fields = parse_infotext("a photo\nstyle: noir, mood: dark")
    assert fields == {"Prompt": "a photo\nstyle: noir, mood: dark", "Negative prompt": ""}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"negative_prompt": "", "clip_skip": 2},
        {"batch_size": 3, "batch_pos": 2, "strength": 0.5},
        {"prompt": "line one\nline two, with: colon", "negative_prompt": "bad\nworse"},
        {"prompt": "夜の灯台、波 🌊", "negative_prompt": "ぼやけ", "model_name": "modèle: «α»"},
        {"model_hash": None, "model_name": None},
        {
            "vae_hash": "0123456789",
            "vae_name": "vae-ft-mse-840000-ema-pruned",
            "prediction_type": "v_prediction",
        },
        {"clip_skip": 12},
        {
            "prompt": "a fox <lora:paper.v1:0.8> <lora:[XL] b:-0.5:1>",
            "lora_hashes": "paper.v1: 0123456789ab, [XL] b: ba9876543210",
        },
    ],
)
def test_round_trip(overrides: dict[str, Any]) -> None:
    params = _params(**overrides)
    assert to_parameters(parse_infotext(format_infotext(params))) == params


def test_png_chunk_reads_back_like_a1111_png_info(tmp_path: Path) -> None:
    text = format_infotext(_params())
    path = save_png(_image(), tmp_path / "out.png", text)
    assert path == tmp_path / "out.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (16, 8)
        assert image.getpixel((3, 3)) == (200, 30, 90)
        assert image.info["parameters"] == text
    raw = path.read_bytes()
    assert b"tEXtparameters\x00" in raw and b"iTXt" not in raw


def test_unicode_prompt_goes_to_an_itxt_chunk(tmp_path: Path) -> None:
    text = format_infotext(_params(prompt="夜の灯台 🌊 — café", negative_prompt="ぼやけ"))
    path = save_png(_image(), tmp_path / "unicode.png", text)
    with Image.open(path) as image:
        assert image.info["parameters"] == text
    assert b"iTXtparameters\x00" in path.read_bytes()
    assert parse_infotext(text)["Prompt"] == "夜の灯台 🌊 — café"


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    save_png(_image(), target, "old")
    before = target.read_bytes()
    with pytest.raises(OSError, match="CMYK"):  # PNG cannot hold CMYK: pillow fails mid-save
        save_png(Image.new("CMYK", (8, 8)), target, "new")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_replaces_and_uses_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"not a png")
    old_umask = os.umask(0o022)
    try:
        save_png(_image(), target, "new")
    finally:
        os.umask(old_umask)
    assert target.stat().st_mode & 0o777 == 0o644
    with Image.open(target) as image:
        assert image.info["parameters"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
