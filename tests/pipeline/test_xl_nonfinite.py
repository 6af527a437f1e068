"""Non-finite VAE output on SDXL (tiny-xl): a decode that yields NaN or inf fails the request with one
line naming the VAE decoder, through ``Pipeline.generate`` and ``sd-engine generate`` (no PNG, exit code
non-zero), instead of a black image.

SDXL's own VAE is the classic case (in fp16 it overflows into NaN, hence the community's fp16-fix VAE);
here copies of the tiny-xl engine folder carry a VAE decoder whose output bias holds NaN or inf, the
other graphs linked, not copied. See tests/pipeline/test_nonfinite.py for SD 1.x and the other graphs.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engine import Pipeline
from engine.cli import main
from engine.errors import EngineError, RequestError
from engine.manifest import read_manifest
from engine.specs import Network

PROMPT = "a lighthouse at dusk"
VALUES = {"nan": np.nan, "inf": np.inf}
# the error line: the network, the backend, the output and what was in it (64 x 64 px, 3 channels)
ERROR = r"vae_decoder \(on CPUExecutionProvider\): non-finite values in 'image' \({}\)"
COUNTS = {"nan": "4096 NaN and 0 inf of 12288", "inf": "0 NaN and 4096 inf of 12288"}


def _damaged_copy(engine: Path, target: Path, value: float) -> Path:
    """``engine`` as a folder of links but for a VAE decoder whose conv_out bias is ``value`` in the first
    channel: that channel of every pixel comes out NaN or inf (the optimized-graph cache left behind)."""
    target.mkdir()
    for item in engine.iterdir():
        if not item.name.startswith(".") and item.name != "vae_decoder.onnx":
            (target / item.name).symlink_to(item)
    assert not read_manifest(engine).graphs[Network.VAE_DECODER].external_data
    model = onnx.load(engine / "vae_decoder.onnx")
    bias = next(t for t in model.graph.initializer if t.name.endswith("conv_out.bias"))
    values = numpy_helper.to_array(bias).copy()
    values[0] = value
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, target / "vae_decoder.onnx")
    return target


@pytest.fixture(scope="module")
def damaged(tiny_xl_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("xl-damaged")
    return {name: _damaged_copy(tiny_xl_engine, folder / name, value) for name, value in VALUES.items()}


@pytest.mark.parametrize("name", list(VALUES))
def test_generate_raises_one_line_naming_the_vae_decoder(damaged: dict[str, Path], name: str) -> None:
    pipe = Pipeline.load(damaged[name])
    steps: list[object] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an error, not NumPy's "invalid value" warning
        with pytest.raises(EngineError) as error:
            pipe.generate(PROMPT, steps=2, width=64, height=64, seed=3, on_step=steps.append)
    message = str(error.value)
    assert not isinstance(error.value, RequestError) and "\n" not in message
    assert re.match("^" + ERROR.format(COUNTS[name]), message), message
    assert len(steps) == 2  # the UNet ran clean: the decode is what failed


@pytest.mark.parametrize("name", list(VALUES))
def test_the_cli_says_one_line_and_writes_no_png(
    damaged: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / "out.png"
    argv = ["generate", str(damaged[name]), PROMPT, "--steps", "1", "--size", "64x64", "--seed", "1"]
    code = main([*argv, "-o", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code != 0 and captured.out == "" and len(lines) == 1, captured.err
    assert re.match("^sd-engine: error: " + ERROR.format(COUNTS[name]), lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []  # no PNG, no temporary file left behind
