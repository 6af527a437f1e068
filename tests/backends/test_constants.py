"""Constants bound once per generation: the prompt embeddings and the guidance scale reach the device
buffers once, each step copies only the latents and the timestep.

ONNX Runtime's IO binding on the CPU device has the same buffers and counters as on CUDA, so the bytes
per step are measured here; images must not change, and a later generation must see its own prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.backends.onnxruntime import BoundRunner, OnnxRuntimeBackend, OrtGraph, OrtOptions
from engine.backends.options import CPU, Switch
from engine.manifest import read_manifest
from engine.pipeline import Pipeline
from engine.runtime import bound
from engine.specs import Network, axis_sizes, sample_inputs

BOUND = {"device": "cpu", "io_binding": True, "threads": 1}
PLAIN = {"device": "cpu", "io_binding": False, "threads": 1}
SETTINGS = {"steps": 4, "width": 64, "height": 64, "sampler": "Euler a", "guidance_scale": 7.5}
CONSTANTS = ("encoder_hidden_states", "guidance_scale")


def _runner(pipe: Pipeline, network: Network) -> BoundRunner:
    graph = pipe.graph(network)
    assert isinstance(graph, OrtGraph) and graph.runner is not None
    return graph.runner


@pytest.mark.parametrize("network", [Network.UNET_CFG, Network.UNET])
def test_a_step_copies_only_the_varying_inputs(tiny_engine: Path, network: Network) -> None:
    manifest = read_manifest(tiny_engine)
    entry = manifest.graphs[network]
    graph = OnnxRuntimeBackend(OrtOptions(device=CPU, io_binding=Switch.ON, threads=1)).load(
        tiny_engine / entry.file, entry.spec
    )
    plain = OnnxRuntimeBackend(OrtOptions(device=CPU, threads=1)).load(tiny_engine / entry.file, entry.spec)
    rng = np.random.default_rng(21)
    sizes = axis_sizes(1, 64, 64, manifest.dims.vae_scale_factor, manifest.dims.text_max_length)
    for _ in range(2):  # two generations: the second binds new constants into the same buffers
        feeds = sample_inputs(entry.spec, sizes, rng)
        constants = {name: feeds[name] for name in CONSTANTS if name in feeds}
        assert graph.runner is not None
        with bound(graph, constants) as run:
            for step in range(3):
                varying = sample_inputs(entry.spec, sizes, rng)
                varying = {name: value for name, value in varying.items() if name not in constants}
                before = graph.runner.bytes_in
                got = run(varying)
                copied = graph.runner.bytes_in - before
                expected_bytes = sum(v.nbytes for v in varying.values())
                if step == 0:
                    expected_bytes += sum(v.nbytes for v in constants.values())
                assert copied == expected_bytes, f"step {step}"
                want = plain.run({**constants, **varying})
                for name, value in want.items():
                    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)
        assert graph.runner.constants == {} and graph.constants == {}
    with pytest.raises(TypeError, match=r"missing inputs \['encoder_hidden_states'"):  # nothing leaks
        graph.run(varying)


def test_binding_keeps_the_image_and_each_generation_uses_its_prompts(tiny_engine: Path) -> None:
    bound_pipe = Pipeline.load(tiny_engine, fused_cfg=True, **BOUND)
    plain_pipe = Pipeline.load(tiny_engine, fused_cfg=True, **PLAIN)
    runner = _runner(bound_pipe, Network.UNET_CFG)
    per_generation = []
    for prompt, seed in (("a red fox", 5), ("a blue boat at night", 5), ("a red fox", 6)):
        before = runner.bytes_in
        got = bound_pipe.generate(prompt, "blurry", seed=seed, **SETTINGS)
        want = plain_pipe.generate(prompt, "blurry", seed=seed, **SETTINGS)
        np.testing.assert_allclose(got.latents, want.latents, rtol=1e-5, atol=1e-5)
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
        per_generation.append(runner.bytes_in - before)
        assert runner.constants == {}  # unbound when the generation ended
    latents = 4 * 8 * 8 * 4  # B=1, 4 channels, 64 px / 8, float32
    embeddings = 2 * manifest_hidden(tiny_engine) * 4  # [negative; positive] x 77 tokens x D, float32
    assert per_generation == [embeddings + 4 + SETTINGS["steps"] * (latents + 4)] * 3


def test_a_cancelled_generation_unbinds(tiny_engine: Path) -> None:
    from engine.errors import Cancelled

    pipe = Pipeline.load(tiny_engine, fused_cfg=True, **BOUND)
    runner = _runner(pipe, Network.UNET_CFG)

    def stop(info: object) -> bool:
        return False

    with pytest.raises(Cancelled):
        pipe.generate("a red fox", seed=1, on_step=stop, **SETTINGS)
    assert runner.constants == {}


def manifest_hidden(engine: Path) -> int:
    dims = read_manifest(engine).dims
    return dims.text_max_length * dims.text_hidden_size
