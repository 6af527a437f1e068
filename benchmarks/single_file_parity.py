"""A single-file checkpoint's engine against diffusers' ``from_single_file``: PSNR and wall times.

    python benchmarks/single_file_parity.py CHECKPOINT ENGINE_DIR CONFIG_DIR [--size 256] [--steps 10]

CHECKPOINT was exported to ENGINE_DIR with ``sd-engine export CHECKPOINT ENGINE_DIR``; CONFIG_DIR is a
diffusers folder of the same architecture, diffusers' ``config=``. A single file ships no tokenizer, so
the engine uses the CLIP BPE bundled in the package and the reference is given the same one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import torch
from transformers import CLIPTokenizer

from engine import Pipeline
from engine.logs import quiet_libraries
from engine.text.tokenizer import bundled_bpe_path, write_tokenizer_folder
from tests.reference import generators, psnr

PROMPT, NEGATIVE = "a lighthouse at dusk, oil painting", "blurry"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("engine", type=Path)
    parser.add_argument("config", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    quiet_libraries()
    settings = {"steps": args.steps, "width": args.size, "height": args.size, "sampler": "DPM++ 2M Karras"}
    start = time.perf_counter()
    ours = Pipeline.load(args.engine).generate(PROMPT, NEGATIVE, seed=42, **settings)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = diffusers.StableDiffusionPipeline.from_single_file(
        str(args.checkpoint), config=str(args.config), local_files_only=True, safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        bundled = write_tokenizer_folder(bundled_bpe_path(), folder)
        reference.tokenizer = CLIPTokenizer.from_pretrained(bundled)
    scheduler = diffusers.DPMSolverMultistepScheduler
    reference.scheduler = scheduler.from_config(reference.scheduler.config, use_karras_sigmas=True)
    reference.set_progress_bar_config(disable=True)
    image = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, width=args.size,
                      height=args.size, generator=generators(42, 1), output_type="np").images[0]  # fmt: skip
    reference_s = time.perf_counter() - start
    print(
        f"{args.checkpoint.name}: {args.size} px, {args.steps} steps DPM++ 2M Karras, torch threads "
        f"{torch.get_num_threads()}: PSNR {psnr(ours.images[0], image):.1f} dB "
        f"(engine {ours_s:.0f} s, diffusers {reference_s:.0f} s incl. load)"
    )


if __name__ == "__main__":
    main()
