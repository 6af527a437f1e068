"""`sd-engine generate --lora FILE[:WEIGHT] --lora-dir DIR` and `<lora:NAME:W>` tags (issue 15).

Every PNG must equal, pixel for pixel, ``Pipeline.load(tiny_engine, lora_dir=DIR).generate(...)`` with the
same LoRA given as a prompt tag, and carry the prompt as typed and A1111's ``Lora hashes``; a LoRA the
engine cannot use is one line on stderr, a non-zero exit and no PNG.

``write_lora_folder`` is shared with tests/service/test_loras.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine import Pipeline
from engine.adapters import Component
from engine.cli import main
from engine.infotext import parse_infotext
from tests.adapters.lora_files import lora_targets_of, select, write_kohya_lora, write_sdxl_like_lora

LORA_NAME = "paper-style.v1"
LORA_ALIAS = "[SD1]Paper Style"
LORA_FILE = f"styles/{LORA_NAME}.safetensors"  # in a subfolder, as A1111 users sort them
SDXL_FILE = "xl-thing.safetensors"
PROMPT = "a paper boat on a pond"
SEED = 21
SMALL = {"steps": 2, "width": 64, "height": 64, "seed": SEED}  # Pipeline.generate keywords
SMALL_ARGS = ("--steps", "2", "--size", "64x64", "--seed", str(SEED))  # the same on the command line


def write_lora_folder(tiny_model: Path, folder: Path) -> Path:
    """A LoRA folder for the tiny model: ``styles/paper-style.v1.safetensors`` (kohya, alias
    "[SD1]Paper Style") over UNet self- and cross-attention, the first resnet 3x3 convs and text-encoder
    q / v projections, and ``xl-thing.safetensors``, an SDXL-shaped LoRA this engine must refuse."""
    import diffusers
    import transformers

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    text_encoder = transformers.CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    targets = lora_targets_of(unet, text_encoder)
    chosen = {
        **select(targets, "attn1.to_q", "attn2.to_k", "attn2.to_v", component=Component.UNET),
        **select(targets, "resnets.0.conv1", component=Component.UNET),
        **select(targets, "self_attn.q_proj", "self_attn.v_proj", component=Component.TEXT_ENCODER),
    }
    assert any(len(shape) == 4 for shape in chosen.values()) and any(
        target[0] is Component.TEXT_ENCODER for target in chosen
    )
    metadata = {"ss_output_name": LORA_ALIAS, "ss_base_model_version": "sd_v1"}
    write_kohya_lora(folder / LORA_FILE, chosen, rank=4, alpha=2.0, seed=0, metadata=metadata)
    write_sdxl_like_lora(folder / SDXL_FILE)
    return folder


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora_folder(tiny_model, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def pipe(tiny_engine: Path, lora_dir: Path) -> Pipeline:
    """The reference: the engine folder loaded in-process with the same LoRA folder."""
    return Pipeline.load(tiny_engine, lora_dir=lora_dir)


def _generate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _png(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The PNG's pixels (HxWx3 uint8) and its parsed A1111 infotext."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")), parse_infotext(image.info["parameters"])


def _reference(pipe: Pipeline, prompt: str, **settings: Any) -> np.ndarray:
    return np.asarray(pipe.generate(prompt, **SMALL, **settings).images[0])


def _short_hash(lora_dir: Path) -> str:
    """A1111's ``Lora hashes`` entry for the LoRA, computed here from its definition (kohya's addnet hash):
    the first 12 hex digits of the sha256 of the file's bytes after the safetensors header."""
    data = (lora_dir / LORA_FILE).read_bytes()
    header_bytes = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_bytes :]).hexdigest()[:12]


# -- images --------------------------------------------------------------------------------------------


def test_lora_option_and_prompt_tag_equal_the_pipeline(
    capsys, tiny_engine: Path, lora_dir: Path, pipe: Pipeline, tmp_path: Path
) -> None:
    tagged = f"{PROMPT} <lora:{LORA_NAME}:0.8>"
    expected = _reference(pipe, tagged)
    assert not np.array_equal(expected, _reference(pipe, PROMPT)), "the LoRA must change the image"

    by_file = tmp_path / "file.png"
    lora_arg = f"{lora_dir / LORA_FILE}:0.8"
    code, _, err = _generate(
        capsys, str(tiny_engine), PROMPT, "--lora", lora_arg, *SMALL_ARGS, "-o", str(by_file)
    )
    assert code == 0, err
    assert err == ""
    pixels, info = _png(by_file)
    np.testing.assert_array_equal(pixels, expected)
    assert info["Prompt"] == tagged  # --lora is recorded as a tag, so the infotext replays it
    assert info["Lora hashes"] == f"{LORA_NAME}: {_short_hash(lora_dir)}"  # named by the file's stem

    by_tag = tmp_path / "tag.png"
    code, _, err = _generate(
        capsys, str(tiny_engine), tagged, "--lora-dir", str(lora_dir), *SMALL_ARGS, "-o", str(by_tag)
    )
    assert code == 0, err
    pixels, info = _png(by_tag)
    np.testing.assert_array_equal(pixels, expected)
    assert info["Prompt"] == tagged  # as typed, tag included: A1111 replays it
    assert info["Lora hashes"] == f"{LORA_NAME}: {_short_hash(lora_dir)}"
    assert info["Seed"] == str(SEED) and info["Steps"] == "2"


def test_lora_without_a_weight_means_one(
    capsys, tiny_engine: Path, lora_dir: Path, pipe: Pipeline, tmp_path: Path
) -> None:
    """``--lora NAME`` (a name in --lora-dir, here by its alias) is the tag ``<lora:NAME:1>``."""
    expected = _reference(pipe, f"{PROMPT} <lora:{LORA_NAME}:1>")
    assert not np.array_equal(expected, _reference(pipe, f"{PROMPT} <lora:{LORA_NAME}:0.8>"))
    out = tmp_path / "one.png"
    code, _, err = _generate(
        capsys, str(tiny_engine), PROMPT, "--lora", LORA_ALIAS, "--lora-dir", str(lora_dir), *SMALL_ARGS,
        "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    pixels, info = _png(out)
    np.testing.assert_array_equal(pixels, expected)
    assert (
        info["Prompt"] == f"{PROMPT} <lora:{LORA_ALIAS}:1>" and _short_hash(lora_dir) in info["Lora hashes"]
    )


# -- one-line errors -----------------------------------------------------------------------------------

ERRORS = {  # id -> (prompt, extra arguments ({dir}: the LoRA folder), words the error line must hold)
    "missing-file": (PROMPT, ["--lora", "{dir}/missing.safetensors:0.5"], ["missing.safetensors"]),
    "unknown-name": (PROMPT, ["--lora", "nope", "--lora-dir", "{dir}"], ["'nope'", LORA_NAME]),
    "unknown-tag": (f"{PROMPT} <lora:nope:0.7>", ["--lora-dir", "{dir}"], ["'nope'"]),
    "tag-without-lora-dir": (f"{PROMPT} <lora:{LORA_NAME}>", [], [LORA_NAME, "lora-dir"]),
    "sdxl-lora": (PROMPT, ["--lora", "{dir}/" + SDXL_FILE], ["SDXL", SDXL_FILE]),
    "sdxl-tag": (f"{PROMPT} <lora:xl-thing:0.5>", ["--lora-dir", "{dir}"], ["SDXL"]),
    "lora-dir-missing": (PROMPT, ["--lora-dir", "{dir}/nowhere"], ["nowhere"]),
    "bad-tag-weight": (f"{PROMPT} <lora:{LORA_NAME}:abc>", ["--lora-dir", "{dir}"], ["'abc'"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_unusable_lora_is_one_line_and_writes_nothing(
    capsys, tiny_engine: Path, lora_dir: Path, tmp_path: Path, case: str
) -> None:
    prompt, extra, named = ERRORS[case]
    out = tmp_path / "never.png"
    args = [arg.format(dir=lora_dir) for arg in extra]
    code, stdout, err = _generate(capsys, str(tiny_engine), prompt, *args, *SMALL_ARGS, "-o", str(out))
    assert code != 0 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd-engine: error: "), err
    assert "Traceback" not in err
    for word in named:  # "lora-dir" also matches "lora_dir"
        assert word in lines[0].replace("lora_dir", "lora-dir"), f"{word!r} not in {lines[0]!r}"
    assert list(tmp_path.iterdir()) == []


def test_render_applies_prompt_tags_with_lora_dir(
    capsys: pytest.CaptureFixture[str], tiny_engine: Path, lora_dir: Path, pipe: Pipeline, tmp_path: Path
) -> None:
    """`sd-engine render --lora-dir`: a jobs row with a tag renders the pipeline's image for that tag."""
    prompt = f"{PROMPT} <lora:{LORA_NAME}:0.8>"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"{prompt}\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["render", str(jobs), str(out), "--engine", str(tiny_engine), "--lora-dir", str(lora_dir)]
    argv += ["--seeds", str(SEED), "--steps", "2", "--size", "64x64", "--no-review"]
    code = main(argv)
    capsys.readouterr()
    assert code == 0
    (png,) = sorted(out.glob("*.png"))
    want = np.asarray(pipe.generate(prompt, **SMALL).images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), want)
    assert main(["render", str(jobs), str(tmp_path / "o2"), "--engine", str(tiny_engine),
                 "--lora-dir", str(tmp_path / "none")]) == 1  # fmt: skip
    assert "--lora-dir" in capsys.readouterr().err


def test_render_renders_again_when_a_lora_file_changes(
    capsys: pytest.CaptureFixture[str], tiny_engine: Path, lora_dir: Path, tmp_path: Path
) -> None:
    """An item's key includes its LoRA files' content hashes: a replaced file is not "already done"."""
    import shutil

    folder = tmp_path / "loras"
    shutil.copytree(lora_dir, folder)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"{PROMPT} <lora:{LORA_NAME}:0.8>\n", encoding="utf-8")
    argv = [
        "render",
        str(jobs),
        str(tmp_path / "out"),
        "--engine",
        str(tiny_engine),
        "--lora-dir",
        str(folder),
    ]
    argv += ["--seeds", str(SEED), "--steps", "2", "--size", "64x64", "--no-review"]
    assert main(argv) == 0
    (png,) = sorted((tmp_path / "out").glob("*.png"))
    before = np.asarray(Image.open(png).convert("RGB"))
    capsys.readouterr()
    assert main(argv) == 0
    assert "1 already done" in "".join(capsys.readouterr())  # nothing changed: nothing to render
    path = folder / LORA_FILE
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)  # other LoRA weights under the same name: a replaced file
    path.write_bytes(bytes(data))
    assert main(argv) == 0
    assert "1 already done" not in "".join(capsys.readouterr())
    after = np.asarray(Image.open(png).convert("RGB"))
    assert not np.array_equal(before, after)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("a.safetensors", ("a.safetensors", 1.0, 1.0)),
        ("a.safetensors:0.5", ("a.safetensors", 0.5, 0.5)),
        ("a.safetensors:0.5:-1", ("a.safetensors", 0.5, -1.0)),
        ("name", ("name", 1.0, 1.0)),
    ],
)
def test_lora_option_parsing(text: str, parsed: tuple[str, float, float]) -> None:
    from engine.commands.generate import parse_lora_arg

    assert parse_lora_arg(text) == parsed


def test_lora_option_with_a_bad_weight_is_one_line(
    capsys: pytest.CaptureFixture[str], tiny_engine: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.png"
    code = main(
        ["generate", str(tiny_engine), PROMPT, "--lora", "style.safetensors:abc", "-o", str(out), *SMALL_ARGS]
    )
    err = capsys.readouterr().err
    assert code != 0 and "'abc' is not a number" in err and err.count("\n") == 1 and not out.exists()
