"""What switching LoRAs costs on ONNX Runtime: first use, cached use, back to none, and memory.

    python benchmarks/lora_switch.py ENGINE_DIR [--rank 16] [--size 256] [--steps 4] \
        [--export-seconds S] [--out benchmarks/results/NAME]

Two random kohya-format LoRAs (rank ``--rank``, alpha rank/2) over every patchable weight of the
engine (UNet attention, feed-forward, projections and convolutions, and the text encoder's
projections, as export mapped them) are written to a temporary folder. One pipeline then generates,
in order: no LoRA (warm-up), LoRA A (first use: parse, merge, a new optimized session), A again
(cached), LoRA B (first use while A is cached), A (still cached), no LoRA (the base graphs, untouched).
Each row reports the ``lora`` stage (what the switch costs, from ``GenerationResult.timings``), the whole
generation, the process's resident memory after it and its peak so far (VmRSS / VmHWM), and whether
the no-LoRA images are bit-identical. ``--export-seconds``: the wall time of an `sd-engine export` of
the same model, for the ratio "switch against re-export" (the export log prints it).
Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.bench.writers import write_json_and_table
from engine.manifest import read_manifest
from engine.pipeline import Pipeline
from engine.specs import Network

PROMPT = "a lighthouse on a cliff at dusk"


def memory_kib() -> dict[str, int]:
    """Resident and peak resident memory of this process (KiB), from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def write_lora(engine_dir: Path, path: Path, rank: int, seed: int) -> int:
    """A kohya LoRA over every weight the engine's text encoder and UNet graphs map; returns the count."""
    from safetensors.numpy import save_file

    manifest = read_manifest(engine_dir)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for network, prefix in ((Network.TEXT_ENCODER, "lora_te_text_model_"), (Network.UNET, "lora_unet_")):
        for target, ref in manifest.graphs[network].weights.items():
            module = target.split(":", 1)[1].replace(".", "_")
            out_dim, in_dim, *kernel = ref.shape
            down_shape = (rank, in_dim, *kernel)
            up_shape = (out_dim, rank, *([1, 1] if kernel else []))
            scale = 0.5 / np.sqrt(in_dim * (np.prod(kernel) if kernel else 1))
            tensors[f"{prefix}{module}.lora_down.weight"] = (rng.standard_normal(down_shape) * scale).astype(
                np.float16
            )
            tensors[f"{prefix}{module}.lora_up.weight"] = (rng.standard_normal(up_shape) / rank).astype(
                np.float16
            )
            tensors[f"{prefix}{module}.alpha"] = np.array(rank / 2, dtype=np.float16)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return len(tensors) // 3


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        modules = write_lora(args.engine_dir, loras / "style_a.safetensors", args.rank, 1)
        write_lora(args.engine_dir, loras / "style_b.safetensors", args.rank, 2)
        start = time.perf_counter()
        pipe = Pipeline.load(args.engine_dir, lora_dir=loras)
        load_s = time.perf_counter() - start
        settings = {"steps": args.steps, "width": args.size, "height": args.size, "seed": 7}
        plan = [
            ("none (warm-up)", ""),
            ("A first use", "<lora:style_a:0.8>"),
            ("A again (in memory)", "<lora:style_a:0.8>"),
            ("B first use", "<lora:style_b:0.8>"),
            ("A again after B (disk cache)", "<lora:style_a:0.8>"),
            ("none (base)", ""),
        ]
        rows, base = [], None
        for label, tag in plan:
            begin = time.perf_counter()
            result = pipe.generate(f"{PROMPT} {tag}".strip(), **settings)
            total = time.perf_counter() - begin
            pixels = np.asarray(result.images[0])
            same = None
            if not tag:
                same = base is None or bool(np.array_equal(base, pixels))
                base = pixels if base is None else base
            rows.append(
                {
                    "step": label,
                    "lora_s": result.timings["lora"] / 1000,
                    "generate_s": total,
                    **memory_kib(),
                    "base_identical": same,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {
        "engine_dir": str(args.engine_dir),
        "modules_patched": modules,
        "rank": args.rank,
        "size": args.size,
        "steps": args.steps,
        "load_s": load_s,
        "export_s": args.export_seconds,
        "rows": rows,
    }


def table(report: dict) -> str:
    export_s = report["export_s"]
    head = (
        "| step | LoRA switch s | generate s | RSS GiB | peak GiB | vs re-export |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in report["rows"]:
        ratio = f"{export_s / row['lora_s']:.0f}x faster" if export_s and row["lora_s"] > 0.05 else ""
        lines.append(
            f"| {row['step']} | {row['lora_s']:.2f} | {row['generate_s']:.2f} | "
            f"{row['VmRSS'] / 2**20:.2f} | {row['VmHWM'] / 2**20:.2f} | {ratio} |"
        )
    note = (
        f"\n{report['modules_patched']} modules patched per LoRA (rank {report['rank']}); "
        f"pipeline load {report['load_s']:.1f} s; re-export {export_s or 'not measured'} s.\n"
    )
    return head + "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--export-seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args)
    text = table(report)
    print(text)
    if args.out is not None:
        write_json_and_table(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
