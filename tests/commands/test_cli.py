"""The command line: user mistakes get one line on stderr, a non-zero exit and nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sd-engine: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture()
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_export_nonexistent_model(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, "export", str(tmp_path / "nope"), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "model not found", "nope")
    assert not (tmp_path / "engine").exists()


def test_export_folder_missing_vae(capsys, model_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(model_copy / "vae")
    code, err = _run(capsys, "export", str(model_copy), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "vae/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_truncated_safetensors(capsys, model_copy: Path, tmp_path: Path) -> None:
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _run(capsys, "export", str(model_copy), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "truncated", "diffusion_pytorch_model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_without_model_index(capsys, model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "model_index.json").unlink()
    code, err = _run(capsys, "export", str(model_copy), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "model_index.json")


def test_export_unsupported_pipeline(capsys, model_copy: Path, tmp_path: Path) -> None:
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (model_copy / "model_index.json").write_text(json.dumps(index))
    code, err = _run(capsys, "export", str(model_copy), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "unsupported pipeline class", "FluxPipeline")


def test_export_config_weights_mismatch(capsys, model_copy: Path, tmp_path: Path) -> None:
    config_path = model_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 48
    config_path.write_text(json.dumps(config))
    code, err = _run(capsys, "export", str(model_copy), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "unet: config/weights mismatch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_missing_weights_file(capsys, model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "text_encoder" / "model.safetensors").unlink()
    code, err = _run(capsys, "export", str(model_copy), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "text_encoder", "no weights file")


def test_export_refuses_non_empty_target(capsys, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "keep.txt").write_text("mine")
    code, err = _run(capsys, "export", str(tiny_model), str(tmp_path / "engine"))
    _assert_one_line_error(code, err, "exists and is not empty")
    assert (tmp_path / "engine" / "keep.txt").read_text() == "mine"


def test_init_random_unknown_preset_is_a_usage_error(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["init-random", "sdxx", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_prints_one_line(tmp_path: Path) -> None:
    """The installed entry point, in a real process: no traceback reaches the user."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "export", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"sd-engine: error: model not found: {tmp_path / 'missing'} "
        "(a diffusers folder or a .safetensors checkpoint)"
    ]


def test_size_takes_wxh_or_one_side() -> None:
    """The CLI reads sizes as the bench does: ``WxH`` or ``N`` for a square."""
    from engine.commands.common import parse_size

    assert parse_size("64") == (64, 64)
    assert parse_size(" 96 x 64 ") == (96, 64)
