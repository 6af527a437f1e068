"""`sd-engine generate`: PNGs with A1111 infotext, batches, img2img, one-line errors, the default engine."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.commands.generate import ProgressBar, output_paths, render_bar
from engine.infotext import parse_infotext
from engine.manifest import read_manifest
from engine.pipeline import StepInfo

REPO = Path(__file__).resolve().parents[2]


def _generate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _infotext(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return parse_infotext(image.info["parameters"])


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".tmp"))


@pytest.fixture()
def init_image(tmp_path: Path) -> Path:
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(path)
    return path


def test_txt2img_writes_png_whose_parameters_parse_back(capsys, tiny_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "apple.png"
    code, stdout, err = _generate(
        capsys, str(tiny_engine), "a red apple, on a table", "--negative", "blurry", "--steps", "3",
        "--cfg", "6.5", "--size", "64x48", "--sampler", "DDIM", "--seed", "7", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal
    lines = stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{out}  seed 7  ")
    with Image.open(out) as image:
        assert image.size == (64, 48)
    source = read_manifest(tiny_engine).source  # A1111's short hash of the model, not of an ONNX graph
    assert _infotext(out) == {
        "Prompt": "a red apple, on a table",
        "Negative prompt": "blurry",
        "Steps": "3",
        "Sampler": "DDIM",
        "CFG scale": "6.5",
        "Seed": "7",
        "Size": "64x48",
        "Model hash": source["short_hash"],
        "Model": source["name"],
    }
    assert _pngs(tmp_path) == ["apple.png"]


def test_batch_writes_one_file_per_image_with_consecutive_seeds(
    capsys, tiny_engine: Path, tmp_path: Path
) -> None:
    out = tmp_path / "batch.png"
    code, stdout, err = _generate(
        capsys, str(tiny_engine), "boats", "--steps", "2", "--size", "64x64", "--seed", "100", "--batch", "2",
        "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    second = tmp_path / "batch-1.png"
    assert [line.split("  ")[:2] for line in stdout.splitlines()] == [
        [str(out), "seed 100"],
        [str(second), "seed 101"],
    ]
    first_info, second_info = _infotext(out), _infotext(second)
    assert (first_info["Seed"], first_info["Batch size"], first_info["Batch pos"]) == ("100", "2", "0")
    assert (second_info["Seed"], second_info["Batch size"], second_info["Batch pos"]) == ("101", "2", "1")
    with Image.open(out) as a, Image.open(second) as b:
        assert a.tobytes() != b.tobytes()
    assert _pngs(tmp_path) == ["batch-1.png", "batch.png"]


@pytest.mark.parametrize("seed_args", [[], ["--seed", "-1"]])
def test_random_seed_is_reported_and_recorded(
    capsys, tiny_engine: Path, tmp_path: Path, seed_args: list[str]
) -> None:
    """A1111's policy: no seed or -1 is a random seed in 0..2**32-1, printed and in the infotext."""
    out = tmp_path / "r.png"
    code, stdout, err = _generate(
        capsys, str(tiny_engine), "fog", "--steps", "1", "--size", "64x64", *seed_args, "-o", str(out)
    )
    assert code == 0, err
    seed = stdout.split("  ")[1].removeprefix("seed ")
    assert _infotext(out)["Seed"] == seed and 0 <= int(seed) <= 2**32 - 1


def test_last_seeds_and_sampler_spelling(capsys, tiny_engine: Path, tmp_path: Path) -> None:
    """Image i gets seed + i up to 2**32 - 1 and records it (so every recorded seed replays); a batch
    that would pass it is one line; the sampler is recorded under its canonical name however typed."""
    out = tmp_path / "edge.png"
    code, stdout, err = _generate(
        capsys, str(tiny_engine), "fog", "--steps", "1", "--size", "64x64", "--seed", str(2**32 - 2),
        "--batch", "2", "--sampler", " euler  A ", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert [line.split("  ")[1] for line in stdout.splitlines()] == ["seed 4294967294", "seed 4294967295"]
    info = _infotext(tmp_path / "edge-1.png")
    assert (info["Seed"], info["Sampler"]) == ("4294967295", "Euler a")
    code, stdout, err = _generate(
        capsys,
        str(tiny_engine),
        "fog",
        "--steps",
        "1",
        "--seed",
        str(2**32 - 1),
        "--batch",
        "2",
        "-o",
        str(out),
    )
    assert code == 1 and err.strip() == (
        "sd-engine: error: seed must be -1 (random) or an integer in 0..4294967294 "
        "(its 2 images take seed..seed+1), got 4294967295"
    )


def test_img2img_records_denoising_strength_and_clip_skip(
    capsys, tiny_engine: Path, tmp_path: Path, init_image: Path
) -> None:
    out = tmp_path / "i2i.png"
    code, _, err = _generate(
        capsys, str(tiny_engine), "waves", "--steps", "4", "--size", "64x64", "--seed", "3",
        "--init-image", str(init_image), "--strength", "0.5", "--clip-skip", "2", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    info = _infotext(out)
    assert (info["Denoising strength"], info["Clip skip"], info["Seed"]) == ("0.5", "2", "3")


@pytest.fixture()
def future_engine(tiny_engine: Path, tmp_path: Path) -> Path:
    engine = Path(shutil.copytree(tiny_engine, tmp_path / "future"))
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["format_version"] = 999
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine


# argv after the defaults (--steps 2 -o out.png; later options win), and what the error line names.
BAD_INPUTS = {
    "width 100": (["{engine}", "p", "--size", "100x64"], ["width", "multiple of 8", "100"]),
    "steps 0": (["{engine}", "p", "--steps", "0"], ["steps", "0"]),
    "seed -2": (["{engine}", "p", "--seed", "-2"], ["seed", "-1 (random)", "-2"]),
    "seed 2**32": (["{engine}", "p", "--seed", "4294967296"], ["seed", "4294967295"]),
    "clip skip 3 on a 2-layer encoder": (
        ["{engine}", "p", "--clip-skip", "3"],
        ["clip_skip", "3", "2 layers"],
    ),
    "clip skip 13": (["{engine}", "p", "--clip-skip", "13"], ["clip_skip", "1..12"]),
    "img2img strength keeps no step": (
        ["{engine}", "p", "--init-image", "{init}", "--steps", "1", "--strength", "0.5"],
        ["strength", "0.5"],
    ),
    "unknown sampler": (
        ["{engine}", "p", "--sampler", "Euler z"],
        ["'Euler z'", "Euler a", "DPM++ 2M Karras"],
    ),
    "strength 1.5": (["{engine}", "p", "--init-image", "{init}", "--strength", "1.5"], ["strength", "1.5"]),
    "missing init image": (["{engine}", "p", "--init-image", "{tmp}/nope.png"], ["init image not found"]),
    "unreadable init image": (
        ["{engine}", "p", "--init-image", "{tmp}/notes.png"],
        ["cannot read init image"],
    ),
    "missing engine": (["{tmp}/no-engine", "p"], ["engine folder not found", "no-engine"]),
    "format version 999": (["{future}", "p"], ["format version 999", "re-export"]),
    "not a png": (["{engine}", "p", "-o", "{tmp}/out.jpg"], ["output must be a .png file"]),
    "missing output folder": (
        ["{engine}", "p", "-o", "{tmp}/missing/out.png"],
        ["output folder does not exist"],
    ),
    "cuda graph on the cpu": (
        ["{engine}", "p", "--cuda-graph", "on"],
        ["CUDAExecutionProvider", "onnxruntime-gpu"],
    ),
    "cuda graph with torch": (
        ["{engine}", "p", "--backend", "torch", "--cuda-graph", "on"],
        ["--cuda-graph"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_writes_nothing(
    case: str, capsys, tiny_engine: Path, future_engine: Path, init_image: Path, tmp_path: Path
) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    template, needles = BAD_INPUTS[case]
    values = {"engine": tiny_engine, "init": init_image, "tmp": tmp_path, "future": future_engine}
    argv = [arg.format(**values) for arg in template]
    code, stdout, err = _generate(capsys, "--steps", "2", "-o", str(tmp_path / "out.png"), *argv)
    assert code == 1
    assert stdout == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sd-engine: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _pngs(tmp_path) == ["init.png", "notes.png"]
    assert not (tmp_path / "missing").exists()


def test_fused_guidance_can_be_turned_off(capsys, tiny_engine: Path, tmp_path: Path) -> None:
    args = ["a red apple", "--steps", "3", "--size", "64x48", "--seed", "7"]
    assert _generate(capsys, str(tiny_engine), *args, "-o", str(tmp_path / "fused.png"))[0] == 0
    assert (
        _generate(capsys, str(tiny_engine), *args, "--fused-cfg", "off", "-o", str(tmp_path / "host.png"))[0]
        == 0
    )
    with Image.open(tmp_path / "fused.png") as fused, Image.open(tmp_path / "host.png") as host:
        diff = np.abs(np.asarray(fused, np.int16) - np.asarray(host, np.int16))
    assert diff.max() <= 1  # the same image, to float rounding


def test_bad_size_format_is_an_argparse_error(capsys, tiny_engine: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tiny_engine), "p", "--size", "64by64", "-o", str(tmp_path / "o.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --size: expected N or WxH such as 512 or 512x768, got '64by64'" in err.splitlines()[-1]
    assert not (tmp_path / "o.png").exists()


def test_samplers_command_lists_names(capsys) -> None:
    assert main(["samplers"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert "Euler a" in names and "DPM++ 2M Karras" in names and "EulerAncestralDiscreteScheduler" in names


def test_output_paths_number_the_rest_of_a_batch() -> None:
    assert output_paths(Path("d/out.png"), 3) == [Path("d/out.png"), Path("d/out-1.png"), Path("d/out-2.png")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    assert render_bar(7, 20, width=10) == "[###.......] 7/20 steps"
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = ProgressBar(stream)
        for step in (1, 2):
            bar(StepInfo(step=step, total=2, timestep=500.0))
        bar.close()
    assert terminal.getvalue() == "\r[" + "#" * 15 + "." * 15 + "] 1/2 steps\r[" + "#" * 30 + "] 2/2 steps\n"
    assert pipe.getvalue() == ""


def _default_sigint() -> None:
    """In the child before exec: SIGINT as at an interactive shell. A shell running the suite in the
    background ignores SIGINT, the child inherits that, and Python then installs no handler for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_with_one_line_and_no_file(tiny_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "slow.png"
    argv = ["-v", "generate", str(tiny_engine), "p", "--steps", "1000", "--batch", "8", "--size", "64x64"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *argv, "-o", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # -v logs "loaded ..." once the graphs are up and generation starts
        if line.startswith("loaded "):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert stdout == ""
    assert err.strip().splitlines() == ["sd-engine: error: interrupted"]
    assert list(tmp_path.iterdir()) == []


def test_default_engine_build_is_clear_about_missing_torch(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from engine.cli import main\n"
        "sys.exit(main(['generate', 'a prompt', '-o', sys.argv[1]]))\n"
    )
    env = {**os.environ, "SD_ENGINE_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "o.png")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        'sd-engine: error: building the default engine needs torch: pip install "sd-engine[export]" '
        "(or pass an ENGINE_DIR)"
    ]
    assert not (tmp_path / "o.png").exists()


def test_a_built_default_engine_is_reused_and_used_by_the_cli(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_engine: Path
) -> None:
    """The CI tier: the session's tiny engine is what the build makes (the tiny preset, seed 0, default
    export settings), placed where the build puts it; the build itself runs in the slow tier below."""
    from engine.commands.default_engine import DEFAULT_SEED, default_engine_dir, ensure_default_engine

    assert DEFAULT_SEED == 0  # tiny_engine's seed
    monkeypatch.setenv("SD_ENGINE_HOME", str(tmp_path / "home"))
    shutil.copytree(tiny_engine, default_engine_dir())
    stamp = (default_engine_dir() / "manifest.json").stat().st_mtime_ns
    messages: list[str] = []
    assert ensure_default_engine(progress=messages.append) == default_engine_dir()
    assert messages == []  # reused: no build, no progress
    _generate_with_the_default_engine(capsys, tmp_path, default_engine_dir(), stamp)


@pytest.mark.slow  # 80 s: a whole tiny export; the test above covers reuse and the CLI in the CI tier
def test_default_engine_is_built_once_then_reused(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from engine.commands.default_engine import default_engine_dir, ensure_default_engine

    monkeypatch.setenv("SD_ENGINE_HOME", str(tmp_path / "home"))
    messages: list[str] = []
    engine = ensure_default_engine(progress=messages.append)
    assert engine == tmp_path / "home" / "engines" / "tiny" == default_engine_dir()
    assert read_manifest(engine).graphs and any("building the default engine" in m for m in messages)
    stamp = (engine / "manifest.json").stat().st_mtime_ns
    built = len(messages)
    assert ensure_default_engine(progress=messages.append) == engine
    assert len(messages) == built  # reused: no build, no progress
    assert (engine / "manifest.json").stat().st_mtime_ns == stamp

    _generate_with_the_default_engine(capsys, tmp_path, engine, stamp)


def _generate_with_the_default_engine(capsys, tmp_path: Path, engine: Path, stamp: int) -> None:
    """Without ENGINE_DIR the CLI uses the default engine, at 64x64, and leaves it as it was."""
    out = tmp_path / "default.png"
    code, stdout, err = _generate(capsys, "a tiny prompt", "--steps", "2", "--seed", "5", "-o", str(out))
    assert code == 0, err
    assert stdout.startswith(f"{out}  seed 5  ")
    info = _infotext(out)
    assert (info["Size"], info["Model"], info["Prompt"]) == ("64x64", "tiny", "a tiny prompt")
    assert (engine / "manifest.json").stat().st_mtime_ns == stamp
