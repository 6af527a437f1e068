"""Imports stay light: each module, imported alone in a fresh interpreter, loads nothing it must not.

The runtime (CLI, pipeline, schedulers, tokenizer, backends) never loads torch, diffusers, transformers or
the onnx exporter; no backend loads build or export code (polygraphy, engine.onnx, engine.export, the
TensorRT builder, the torch wrappers), so running a plan needs none of the build's dependencies. The
torch backends import torch only when they load a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The export extra's stack; "onnx" is the exporter's package (onnxruntime is the runtime and allowed).
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "onnx", "onnxscript", "polygraphy")
EXPORT_CODE = ("engine.onnx", "engine.export", "engine.models.torch_modules")
BUILD_CODE = ("engine.build_trt", "engine.tensorrt.builder", "torch.onnx")

BACKENDS = (
    "engine.runtime",
    "engine.backends.onnxruntime",
    "engine.backends.openvino",
    "engine.backends.tensorrt",
    "engine.backends.torch_cpu",
    "engine.backends.torch_cuda",
    "engine.backends.cuda_graph",
    "engine.backends.options",
    "engine.backends.weights",
)
RUNTIME = (
    "engine",
    "engine.build_trt",  # the builder's face: it may load the builder, not torch or the exporter
    "engine.commands.bench",
    "engine.commands.default_engine",
    "engine.errors",
    "engine.infotext",
    "engine.logs",
    "engine.manifest",
    "engine.models.folder",
    "engine.pipeline",
    "engine.pipeline.request",
    "engine.pipeline.loras",
    "engine.adapters",
    "engine.rng",
    "engine.service.app",  # the whole service but server.py (uvicorn only)
    "engine.specs",
    "engine.tensorrt.plans",
    "engine.text.conditioning",
    "engine.text.chunks",
    "engine.text.prompt",
    "engine.text.tokenizer",
)
# What a case does after the import, where using the module is what could load more.
USE = {
    "engine.cli": "engine.cli.build_parser()",  # builds every subcommand's parser, bench included
    "engine.schedulers": "engine.schedulers.create('DPM++ 2M Karras').set_timesteps(5)",
    # `sd-engine render`'s driver and everything it may load (ray itself only when --ray runs)
    "engine.batch.render": "import engine.batch.local, engine.batch.review, engine.batch.ray_runner",
}

CASES = [
    *(pytest.param(name, HEAVY + EXPORT_CODE + BUILD_CODE, id=name) for name in BACKENDS),
    *(pytest.param(name, HEAVY + EXPORT_CODE, id=name) for name in (*RUNTIME, *USE)),
]


def loaded_modules(module: str, forbidden: tuple[str, ...]) -> list[str]:
    """The forbidden modules (or their submodules) in sys.modules after importing `module` alone."""
    code = "\n".join(
        [
            "import json, sys",
            f"import {module}",
            USE.get(module, "pass"),
            f"forbidden = {forbidden!r}",
            "found = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden)]",
            "print(json.dumps(sorted(found)))",
        ]
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, f"importing {module} failed:\n{run.stderr}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("module", "forbidden"), CASES)
def test_module_imports_nothing_forbidden(module: str, forbidden: tuple[str, ...]) -> None:
    assert loaded_modules(module, forbidden) == [], f"import {module} loads forbidden modules"
