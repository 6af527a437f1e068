"""torch.compile of the UNet on the torch and torch-cuda backends (the ``compile`` option).

The option checks run everywhere and compile nothing. Compiling the tiny UNet with TorchInductor on a
2-core CPU takes minutes with a cold cache (C++ kernel builds), so that test is marked ``slow``. The
``gpu`` tests compile on CUDA (Triton) and capture the compiled UNet in the runner's CUDA graph; each
skips with the reason where torch sees no GPU. `benchmarks/gpu.sh` runs them on a CUDA machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backends.options import parse_backend_options
from engine.backends.torch_cpu import COMPILE_MODES, FirstCallClock, TorchGraph, TorchOptions
from engine.backends.torch_cuda import TorchCudaOptions
from engine.errors import EngineError
from engine.manifest import read_manifest
from engine.parity import rel_l2
from engine.runtime import BackendName, check_common_options, open_backend
from engine.specs import GraphSpec, Network, TensorSpec
from tests.backends.marks import needs_cuda

# -- the option, everywhere (nothing compiles) -----------------------------------------------------


@pytest.mark.parametrize("cls", [TorchOptions, TorchCudaOptions])
def test_compile_defaults_off_and_takes_the_modes_that_leave_cuda_graphs_alone(cls: type) -> None:
    assert COMPILE_MODES == ("default", "max-autotune-no-cudagraphs")
    options = parse_backend_options(cls, {}, "x")
    assert options.compile is False and options.compile_mode == "default"
    for mode in COMPILE_MODES:
        chosen = parse_backend_options(cls, {"compile": True, "compile_mode": mode}, "x")
        assert chosen.compile is True and chosen.compile_mode == mode


@pytest.mark.parametrize("cls", [TorchOptions, TorchCudaOptions])
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "fast"])
def test_modes_with_their_own_cuda_graphs_are_refused_in_one_line(cls: type, mode: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_backend_options(cls, {"compile": True, "compile_mode": mode}, "torch-cuda")
    message = str(info.value)
    assert f"compile_mode {mode!r} is not one of default, max-autotune-no-cudagraphs" in message
    assert "\n" not in message


@pytest.mark.parametrize("cls", [TorchOptions, TorchCudaOptions])
def test_compile_is_a_bool(cls: type) -> None:
    with pytest.raises(EngineError, match="compile must be true or false, got 'yes'"):
        parse_backend_options(cls, {"compile": "yes"}, "torch")


def test_only_the_torch_backends_compile() -> None:
    assert [name.value for name in BackendName if name.compiles] == ["torch", "torch-cuda"]
    for name in ("onnxruntime", "tensorrt", "openvino"):
        with pytest.raises(EngineError, match=f"compile: the {name} backend does not use torch.compile"):
            check_common_options(BackendName(name), {"compile": True})
        check_common_options(BackendName(name), {"compile": False})


def test_a_compiled_graph_says_so_before_it_runs() -> None:
    """torch.compile is lazy: wrapping costs nothing, compile_s stays None until the first run."""
    import torch

    spec = GraphSpec(
        Network.UNET, (TensorSpec("x", ("n",), "float32"),), (TensorSpec("y", ("n",), "float32"),)
    )
    module = torch.nn.Identity()
    compiled = TorchGraph(spec, module, compile_mode="default")
    assert compiled.providers == ["torch:cpu:compiled"] and compiled.compile_s is None
    assert compiled.compiled is not None and compiled.module is module
    eager = TorchGraph(spec, module)
    assert eager.providers == ["torch:cpu"] and eager.compiled is None and eager.compile_s is None


def test_first_call_clock_times_only_the_first_call() -> None:
    clock = FirstCallClock()
    synced: list[int] = []
    assert clock.call(lambda x: (time.sleep(0.02), x)[1], 3, sync=lambda: synced.append(1)) == 3
    first = clock.seconds
    assert first is not None and first >= 0.02 and synced == [1]
    assert clock.call(lambda x: x + 1, 3, sync=lambda: synced.append(1)) == 4
    assert clock.seconds == first and synced == [1]


def test_a_failed_first_call_is_one_line_and_not_timed() -> None:
    """What a missing C compiler or Python.h looks like to the backend: a multi-line error from the
    first (compiling) call."""
    clock = FirstCallClock()

    def compile_fails(x: int) -> int:
        raise RuntimeError("\nInductor: Failed to find C compiler. Please specify via CC.\n  File ...\n")

    with pytest.raises(EngineError) as error:
        clock.call(compile_fails, 3)
    assert str(error.value) == (
        "torch.compile failed on the first call (Inductor: Failed to find C compiler. Please specify via "
        "CC.); run without compile"
    )
    assert clock.seconds is None


# -- compiled on the CPU (TorchInductor's C++ backend) ------------------------------------------------


def _cfg_feeds(rng: np.random.Generator, hidden: int) -> dict[str, np.ndarray]:
    return {
        "sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32),
        "timestep": rng.uniform(0, 999, 1).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32),
        "guidance_scale": np.array([7.5], np.float32),
    }


@pytest.mark.slow  # a cold TorchInductor cache builds ~70 C++ kernels: about 2.5 min on 2 cores
def test_compiled_unet_matches_eager_on_the_cpu(tiny_torch_engine: Path) -> None:
    manifest = read_manifest(tiny_torch_engine)
    eager = open_backend("torch", tiny_torch_engine, manifest)(Network.UNET_CFG)
    compiled: Any = open_backend("torch", tiny_torch_engine, manifest, {"compile": True})(Network.UNET_CFG)
    assert compiled.providers == ["torch:cpu:compiled"] and eager.providers == ["torch:cpu"]
    rng = np.random.default_rng(11)
    for _ in range(2):  # the second run reuses the compiled code
        feeds = _cfg_feeds(rng, manifest.dims.text_hidden_size)
        expected = eager.run(feeds)["guided_noise"]
        assert rel_l2(expected, compiled.run(feeds)["guided_noise"]) < 1e-4
    assert compiled.compile_s is not None and compiled.compile_s > 0
    vae = open_backend("torch", tiny_torch_engine, manifest, {"compile": True})(Network.VAE_DECODER)
    assert vae.compiled is None


# -- compiled on CUDA, inside the captured graph --------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_compiled_unet_in_a_cuda_graph_matches_eager_fp16(tiny_torch_engine: Path) -> None:
    """The first warm-up launch compiles, the capture records the compiled kernels, replays match eager
    fp16 launches; the plain UNet and the fused one share one set of weights."""
    manifest = read_manifest(tiny_torch_engine)
    eager = open_backend("torch-cuda", tiny_torch_engine, manifest, {"cuda_graph": False})(Network.UNET_CFG)
    load = open_backend("torch-cuda", tiny_torch_engine, manifest, {"warmup": 1, "compile": True})
    compiled: Any = load(Network.UNET_CFG)
    assert compiled.providers == ["torch:cuda:0:fp16:compiled:cuda-graph"]
    assert eager.providers == ["torch:cuda:0:fp16"] and eager.compile_s is None
    rng = np.random.default_rng(12)
    hidden = manifest.dims.text_hidden_size
    for _ in range(4):  # launch (compiles), capture + replay, replay, replay
        feeds = _cfg_feeds(rng, hidden)
        expected = eager.run(feeds)["guided_noise"]
        assert rel_l2(expected, compiled.run(feeds)["guided_noise"]) < 2e-2
    stats = compiled.runner.stats
    assert (stats.launches, stats.captures, stats.replays) == (1, 1, 3)
    assert compiled.compile_s is not None and compiled.compile_s > 0
    assert compiled.providers == ["torch:cuda:0:fp16:compiled:cuda-graph"]  # the capture did not fail
    plain: Any = load(Network.UNET)
    assert compiled.ops.module.unet is plain.ops.module  # one set of fp16 weights
    assert load(Network.VAE_DECODER).providers == ["torch:cuda:0:fp32"]  # the VAE stays eager


@pytest.mark.gpu
@needs_cuda
def test_compiled_pipeline_reports_compile_time_and_replays(tiny_torch_engine: Path) -> None:
    """A whole generation with the compiled fused UNet: finite image, graph replays, compile time."""
    from engine.pipeline import Pipeline

    pipe = Pipeline.load(tiny_torch_engine, backend="torch-cuda", compile=True)
    settings = {"steps": 6, "width": 64, "height": 64, "seed": 3, "guidance_scale": 7.5}
    first = np.asarray(pipe.generate("a lighthouse", **settings).images[0])
    again = np.asarray(pipe.generate("a lighthouse", **settings).images[0])
    unet: Any = pipe.graph(Network.UNET_CFG)
    assert unet.providers == ["torch:cuda:0:fp16:compiled:cuda-graph"]
    assert unet.runner.stats.captures == 1 and unet.runner.stats.replays >= 2 * settings["steps"] - 2
    assert unet.compile_s is not None and unet.compile_s > 0
    assert np.abs(first.astype(int) - again.astype(int)).max() <= 2  # replays repeat the first run
