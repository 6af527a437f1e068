"""Non-finite values (issue 11, 5e): NaN or inf in a request is refused in one line; a graph output that
overflows raises a one-line EngineError naming the network and the output, on every CPU backend; the
CLI then writes nothing (it used to save a black PNG with only a NumPy warning).

The overflows are real: the tiny engine's UNet fed latents near float32's largest value, its VAE decoder
fed huge latents, and an engine folder whose VAE decoder weights hold a NaN.
"""

from __future__ import annotations

import base64
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from engine import Pipeline
from engine.cli import main
from engine.errors import EngineError, RequestError
from engine.pipeline import GenerationRequest
from engine.runtime import check_finite, nonfinite_names

PROMPT = "a lighthouse at dusk"
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5}


# -- requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "dtype", "counts"),
    [
        (np.nan, np.float32, "1 NaN and 0 inf"),
        (np.inf, np.float32, "0 NaN and 1 inf"),
        (-np.inf, np.float16, "0 NaN and 1 inf"),
        (1e39, np.float64, "0 NaN and 1 inf"),  # finite in float64, inf as the float32 the graphs take
    ],
)
def test_latents_holding_nan_or_inf_are_refused(
    rng: np.random.Generator, value: float, dtype: type, counts: str
) -> None:
    latents = rng.standard_normal((1, 4, 8, 8)).astype(dtype)
    latents[0, 2, 3, 4] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not warned about
        with pytest.raises(RequestError) as error:
            GenerationRequest.create(PROMPT, latents=latents)
    assert str(error.value) == f"latents must be finite, got {counts} values (as float32)"


def test_json_latents_holding_nan_are_refused() -> None:
    latents = np.zeros((1, 4, 8, 8), np.float32)
    data = GenerationRequest.create(PROMPT, latents=latents).to_json()
    latents[0, 0, 0, :3] = np.nan
    data["latents"]["data"] = base64.b64encode(latents.astype("<f4").tobytes()).decode("ascii")
    with pytest.raises(RequestError, match=r"^latents must be finite, got 3 NaN and 0 inf values"):
        GenerationRequest.from_json(data)


def test_image_arrays_and_float_images_holding_nan_are_refused() -> None:
    pixels = np.full((8, 8, 3), 0.5, np.float32)
    pixels[1, 1, 1] = np.nan
    with pytest.raises(RequestError, match=r"^image must be a PIL image or an HxWx3 uint8 array"):
        GenerationRequest.create(PROMPT, image=pixels)
    grey = np.full((8, 8), 0.5, np.float32)
    grey[2, 2] = np.inf
    with pytest.raises(
        RequestError, match=r"^cannot read image: the float image \(mode F\) holds NaN or inf"
    ):
        GenerationRequest.create(PROMPT, image=Image.frombytes("F", (8, 8), grey.tobytes()))


def test_pipeline_refuses_nan_latents_before_running_a_graph(tiny_engine: Path) -> None:
    latents = np.zeros((1, 4, 8, 8), np.float32)
    latents[0, 0, 0, 0] = np.nan
    steps: list[object] = []
    with pytest.raises(RequestError, match=r"^latents must be finite"):
        Pipeline.load(tiny_engine).generate(PROMPT, latents=latents, on_step=steps.append, **SMALL)
    assert steps == []


# -- graph outputs --------------------------------------------------------------------------------


def _overflowing_latents(rng: np.random.Generator) -> np.ndarray:
    """Finite latents the tiny UNet's first convolution overflows on (DDIM feeds them unscaled)."""
    return (np.sign(rng.standard_normal((1, 4, 8, 8))) * 1e38).astype(np.float32)


ORT = r"\(on CPUExecutionProvider\): non-finite values in"
# case -> backend, its options, fused guidance, what the error line starts with
BACKENDS = {
    "onnxruntime, fused guidance": ("onnxruntime", {}, True, rf"unet_cfg at step 1/2 {ORT} 'guided_noise'"),
    "onnxruntime": ("onnxruntime", {}, False, rf"unet at step 1/2 {ORT} 'noise_pred' \(512 NaN"),
    "openvino fp32": (
        "openvino",
        {"precision": "fp32"},
        False,
        r"unet: OpenVINO \(openvino:CPU:fp32\) returned non-finite values in \['noise_pred'\]; the model",
    ),
    "torch": ("torch", {}, False, r"unet at step 1/2 \(on torch:cpu\): non-finite values in 'noise_pred'"),
}


@pytest.mark.parametrize("case", list(BACKENDS))
def test_an_overflowing_unet_raises_on_every_cpu_backend(
    tiny_engine: Path, rng: np.random.Generator, case: str
) -> None:
    backend, options, fused, start = BACKENDS[case]
    if backend == "openvino":
        pytest.importorskip("openvino")
    pipe = Pipeline.load(tiny_engine, backend=backend, fused_cfg=fused, **options)
    latents = _overflowing_latents(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an error, not NumPy's "invalid value" warning
        with pytest.raises(EngineError) as error:
            pipe.generate(PROMPT, latents=latents, sampler="DDIM", **SMALL)
    message = str(error.value)
    assert not isinstance(error.value, RequestError) and "\n" not in message
    assert re.match(start, message), message


def test_an_overflowing_vae_decoder_and_diverged_latents_raise(
    tiny_engine: Path, rng: np.random.Generator
) -> None:
    pipe = Pipeline.load(tiny_engine)
    huge = (np.sign(rng.standard_normal((1, 4, 8, 8))) * 5e37).astype(np.float32)  # finite after scaling
    with pytest.raises(
        EngineError, match=r"^vae_decoder \(on CPUExecutionProvider\): non-finite values in 'image'"
    ):
        pipe.decode(huge)
    diverged = np.zeros((1, 4, 8, 8), np.float32)
    diverged[0, 1, 2, 3] = np.inf
    with pytest.raises(
        EngineError,
        match=r"^latents after denoising: non-finite values in 'latents' \(0 NaN and 1 inf of 256\); the",
    ):
        pipe.decode(diverged)


def test_the_check_names_every_bad_array_and_ignores_integers() -> None:
    arrays = {
        "ids": np.array([1, 2], np.int64),
        "good": np.ones(3, np.float32),
        "a": np.array([np.nan, np.inf, -np.inf, 0], np.float32),
        "b": np.array([np.nan], np.float16),
    }
    assert nonfinite_names(arrays) == ["a", "b"]
    with pytest.raises(
        EngineError, match=r"^x: non-finite values in 'a' \(1 NaN and 2 inf of 4; also in 'b'\); h$"
    ):
        check_finite("x", arrays, hint="h")
    check_finite("x", {"ids": arrays["ids"], "good": arrays["good"]})


def _damaged_engine(tiny_engine: Path, folder: Path) -> Path:
    """A copy of the tiny engine whose VAE decoder's last bias holds a NaN (as a corrupted download
    would); the optimized-graph cache is left behind so the damaged file is what runs."""
    engine = folder / "damaged"
    shutil.copytree(tiny_engine, engine, ignore=shutil.ignore_patterns(".cache"))
    model = onnx.load(engine / "vae_decoder.onnx")
    bias = next(t for t in model.graph.initializer if t.name.endswith("conv_out.bias"))
    values = numpy_helper.to_array(bias).copy()
    values[0] = np.nan
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, engine / "vae_decoder.onnx")
    return engine


def test_the_cli_says_one_line_and_writes_no_black_png(
    capsys: pytest.CaptureFixture[str], tiny_engine: Path, tmp_path: Path
) -> None:
    engine = _damaged_engine(tiny_engine, tmp_path)
    out = tmp_path / "out.png"
    code = main(
        ["generate", str(engine), PROMPT, "--steps", "2", "--size", "64x64", "--seed", "1", "-o", str(out)]
    )
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code != 0 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(
        "sd-engine: error: vae_decoder (on CPUExecutionProvider): non-finite values in 'image'"
    )
    assert not out.exists() and not list(tmp_path.glob("*.png"))
