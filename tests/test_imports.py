"""The runtime stays light: importing it never pulls in torch, diffusers, transformers or onnx."""

from __future__ import annotations

import subprocess
import sys

RUNTIME_MODULES = [
    "engine",
    "engine.cli",
    "engine.errors",
    "engine.manifest",
    "engine.rng",
    "engine.runtime",
    "engine.specs",
    "engine.text.tokenizer",
    "engine.models.folder",
    "engine.infotext",
    "engine.logs",
    "engine.commands.bench",
    "engine.build_trt",
    "engine.backends.tensorrt",
    "engine.backends.cuda_graph",
    "engine.backends.torch_cuda",
    "engine.backends.torch_cpu",
    "engine.commands.default_engine",
    "engine.pipeline",
    "engine.pipeline.request",
    "engine.schedulers",
]
HEAVY = ["torch", "diffusers", "transformers", "onnx", "accelerate"]


def test_runtime_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        f"for name in {RUNTIME_MODULES!r}: __import__(name)\n"
        "import engine.cli; engine.cli.build_parser()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
