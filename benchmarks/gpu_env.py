"""The GPU check's environment record (benchmarks/gpu.sh, stage setup): what is installed, from where,
what the GPU is, and which optional steps skip and why.

    python benchmarks/gpu_env.py --device cuda --site SITE --wheels .whl --json env.json --shell env.sh

Prints one line per package (version, and whether it came from a carried wheel or from the image),
the GPU, and a skip line for each optional step (TensorRT, ONNX Runtime CUDA). Writes the same as
JSON, and a shell file that gpu.sh sources (HAVE_TENSORRT, HAVE_ORT_CUDA, ONNX_NEEDED, TENSORRT_REASON).
Exits 1 with one line per problem when a package the check needs is missing, when sd-engine is not
the installed copy, or when ``--device cuda`` and torch sees no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import shlex
import sys
from pathlib import Path
from typing import Any

# (import name, distribution name, needed by the check)
PACKAGES = (
    ("engine", "sd-engine", True),
    ("numpy", "numpy", True),
    ("PIL", "pillow", True),
    ("tokenizers", "tokenizers", True),
    ("onnxruntime", "onnxruntime", True),
    ("torch", "torch", True),
    ("transformers", "transformers", True),
    ("diffusers", "diffusers", True),
    ("importlib_metadata", "importlib_metadata", True),
    ("safetensors", "safetensors", True),
    ("huggingface_hub", "huggingface_hub", True),
    ("pytest", "pytest", True),
    ("onnx", "onnx", False),
    ("onnxscript", "onnxscript", False),
    ("yaml", "pyyaml", False),
    ("triton", "triton", False),
    ("cuda.bindings", "cuda-bindings", False),
    ("tensorrt", "tensorrt", False),
    ("polygraphy", "polygraphy", False),
)
TENSORRT_TOO_BIG = "its wheels (over 1 GB) do not fit the 64 MiB carried with the tree"
ORT_GPU_TOO_BIG = "onnxruntime-gpu's wheel (about 250 MB) does not fit the 64 MiB carried with the tree"


def package(module: str, dist: str, site: Path) -> dict[str, Any]:
    """Version and origin of one package: "venv" (a carried wheel or the project, installed into the
    fresh virtual environment), "image" (what the machine came with), or "missing"."""
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # an import that fails for any reason is what the record must say
        return {"version": None, "origin": "missing", "error": f"{type(error).__name__}: {error}"}
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(imported, "__version__", "?"))
    where = Path(getattr(imported, "__file__", None) or next(iter(getattr(imported, "__path__", [""])), ""))
    inside = site in where.resolve().parents
    return {"version": version, "origin": "venv" if inside else "image", "path": str(where)}


def wheel_sizes(folder: Path) -> dict[str, int]:
    """The carried wheels: file name -> bytes."""
    if not folder.is_dir():
        return {}
    return {path.name: path.stat().st_size for path in sorted(folder.glob("*.whl")) if path.is_file()}


def gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    return {
        "available": True,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "torch_cuda": torch.version.cuda,
    }


def tensorrt_reason(packages: dict[str, dict[str, Any]], device: str) -> str | None:
    """Why the TensorRT steps skip, or None when they run."""
    if device != "cuda":
        return "no CUDA GPU (dry run on the CPU)"
    if packages["tensorrt"]["origin"] == "missing":
        return f"tensorrt is not installed: {TENSORRT_TOO_BIG}"
    if packages["cuda.bindings"]["origin"] == "missing":
        return "cuda-python is not installed (TensorRT's runtime needs it)"
    return None


def ort_cuda_reason(packages: dict[str, dict[str, Any]], device: str) -> str | None:
    """Why the ONNX Runtime CUDA contender skips, or None when it runs."""
    if device != "cuda":
        return "no CUDA GPU (dry run on the CPU)"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return None
    return (
        f"onnxruntime {packages['onnxruntime']['version']} is a CPU build (no CUDAExecutionProvider): "
        f"{ORT_GPU_TOO_BIG}"
    )


def problems(packages: dict[str, dict[str, Any]], gpu: dict[str, Any], device: str) -> list[str]:
    found = []
    for module, dist, needed in PACKAGES:
        if needed and packages[module]["origin"] == "missing":
            found.append(
                f"{dist} is missing ({packages[module]['error']}): add its wheel to benchmarks/gpu-wheels.txt"
            )
    if packages["engine"]["origin"] == "image":
        found.append(f"sd-engine is imported from {packages['engine']['path']}, not the installed copy")
    if device == "cuda" and not gpu.get("available"):
        found.append(f"torch (CUDA {gpu.get('torch_cuda')}) sees no GPU")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--site", type=Path, required=True, help="the venv's site-packages")
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--shell", type=Path, required=True)
    args = parser.parse_args()
    site = args.site.resolve()
    packages = {module: package(module, dist, site) for module, dist, _ in PACKAGES}
    gpu = gpu_info() if packages["torch"]["origin"] != "missing" else {"available": False}
    trt, ort = tensorrt_reason(packages, args.device), ort_cuda_reason(packages, args.device)
    record = {
        "python": sys.version.split()[0],
        "device": args.device,
        "gpu": gpu,
        "packages": packages,
        "wheels": wheel_sizes(args.wheels),
        "skipped": {"tensorrt": trt, "onnxruntime_cuda": ort},
    }
    args.json.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    flags = {
        "HAVE_TENSORRT": int(trt is None),
        "HAVE_ORT_CUDA": int(ort is None),
        "ONNX_NEEDED": int(trt is None or ort is None),
        "TENSORRT_REASON": shlex.quote(trt or ""),
    }
    args.shell.write_text("".join(f"{k}={v}\n" for k, v in flags.items()), encoding="utf-8")
    print(f"python {record['python']}; device {args.device}; GPU {gpu.get('name', 'none')}")
    for module, dist, _ in PACKAGES:
        entry = packages[module]
        print(f"  {dist:20} {entry['version'] or '-':14} {entry['origin']}")
    print(f"skip: TensorRT (plans, tests, contender): {trt}" if trt else "TensorRT: runs")
    print(f"skip: ONNX Runtime CUDA (contender): {ort}" if ort else "ONNX Runtime CUDA: runs")
    found = problems(packages, gpu, args.device)
    for line in found:
        print(f"gpu_env: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
