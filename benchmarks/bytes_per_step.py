"""Bytes copied host -> device per UNet step through ONNX Runtime IO binding (the CPU device shows it).

before: every step feeds all of the fused-guidance UNet's inputs, as the loop did before a generation's
constants were bound; after: the pipeline binds the embeddings and the guidance scale once per
generation (``engine.runtime.bound``) and each step copies only the latents and the timestep.

    python benchmarks/bytes_per_step.py ENGINE_DIR --size 256 --steps 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from engine.pipeline import Pipeline
from engine.sizes import parse_size
from engine.specs import Network


def all_inputs_once(pipe: Pipeline, width: int, height: int) -> int:
    """Bytes one step copied when every input was fed every step (the UNet's first run is discarded)."""
    unet = pipe.graph(Network.UNET_CFG)
    dims = pipe.manifest.dims
    factor = dims.vae_scale_factor
    feeds = {
        "sample": np.zeros((1, dims.latent_channels, height // factor, width // factor), np.float32),
        "timestep": np.array([999.0], np.float32),
        "encoder_hidden_states": np.zeros((2, dims.text_max_length, dims.text_hidden_size), np.float32),
        "guidance_scale": np.array([7.5], np.float32),
    }
    unet.run(feeds)  # allocates the buffers and learns the output shapes
    before = unet.runner.bytes_in
    unet.run(feeds)
    return unet.runner.bytes_in - before


def per_step_bytes(pipe: Pipeline, width: int, height: int, steps: int) -> list[int]:
    """Bytes each step of one generation copied, with the generation's constants bound."""
    runner = pipe.graph(Network.UNET_CFG).runner
    marks = [runner.bytes_in]
    pipe.generate(
        "a lighthouse at dusk",
        "blurry",
        steps=steps,
        width=width,
        height=height,
        seed=1,
        on_step=lambda info: marks.append(runner.bytes_in),
    )
    return np.diff(marks).tolist()


def square_or_wxh(text: str) -> tuple[int, int]:
    return parse_size(text, square_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--size", type=square_or_wxh, default=(256, 256), metavar="N|WxH")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    width, height = args.size
    pipe = Pipeline.load(args.engine_dir, fused_cfg=True, device="cpu", io_binding=True)
    print(f"before: {all_inputs_once(pipe, width, height)} bytes every step")
    steps = per_step_bytes(pipe, width, height, args.steps)
    print(f"after: step 1 {steps[0]} bytes, steps 2..{len(steps)} {steps[1:]}; total {sum(steps)} bytes")


if __name__ == "__main__":
    main()
