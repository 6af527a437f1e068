"""The openvino backend: the engine folder's ONNX graphs compiled by OpenVINO for the CPU, in bf16.

Why: on CPUs with native bfloat16 (Intel AMX or AVX512-BF16, AMD Zen 4/5) OpenVINO runs the SD 1.5
UNet about 3x faster than fp32 ONNX Runtime, and the images stay within the project's 40 dB bar of
the fp32 ones (measured on this project's machine: see the README's Performance section). fp32
(``precision="fp32"``) is there for comparison; it is no faster than ONNX Runtime.

bf16 keeps fp32's exponent range, so the SD VAE, which overflows in fp16, is safe in it. A bf16 request
on a CPU without bf16 arithmetic is refused (OpenVINO would emulate it slowly), never silently downgraded.

OpenVINO's compiled-model cache (``cache=True``: ``ENGINE_DIR/.cache/openvino``) is off by default: with
it, OpenVINO 2026.4 returned NaN from the tiny UNets in bf16 (reproducibly; without it, never), so every
load compiles (seconds). Every output is checked: a non-finite value raises instead of becoming a black
image.

openvino is imported only inside :func:`open_engine`: this module imports without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.options import CPU, Device, DeviceKind, parse_backend_options
from engine.errors import EngineError, EngineFolderError, MissingDependencyError
from engine.manifest import Manifest, require_onnx
from engine.runtime import OVERFLOW_HINT, Graph, nonfinite_names
from engine.specs import GraphSpec, Network, Precision, check_inputs

OPENVINO_HINT = 'pip install "sd-engine[openvino]"'
CACHE_SUBDIR = Path(".cache") / "openvino"


# OpenVINO's INFERENCE_PRECISION_HINT values of the precisions it runs on the CPU.
OV_PRECISIONS = {Precision.BF16: "bf16", Precision.FP32: "f32"}


@dataclass(frozen=True)
class OpenVinoOptions:
    """device: ``cpu`` only; precision: bf16 (needs a CPU with bf16 arithmetic) or fp32; threads None:
    OpenVINO's choice (the physical cores); cache: keep compiled models under the engine folder (see the
    module notes)."""

    device: Device = CPU
    precision: Precision = Precision.BF16
    threads: int | None = None
    cache: bool = False


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError(f"the openvino backend needs OpenVINO: {OPENVINO_HINT}") from None
    return openvino


def check_options(options: OpenVinoOptions) -> None:
    """The CPU, in a precision OpenVINO runs there."""
    if options.device.kind is not DeviceKind.CPU:
        raise EngineError(f"the openvino backend runs on cpu, not {options.device}")
    if options.precision not in OV_PRECISIONS:
        valid = ", ".join(p.value for p in OV_PRECISIONS)
        raise EngineError(f"the openvino backend runs in {valid}, not {options.precision.value}")


def check_precision(core: Any, precision: Precision) -> None:
    """bf16 only where the CPU computes in it; OpenVINO would otherwise emulate or fall back."""
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if precision is Precision.BF16 and "BF16" not in capabilities:
        raise EngineError(
            f"this CPU has no bfloat16 arithmetic (OpenVINO reports {capabilities}); "
            "use the openvino backend with precision=fp32, or the onnxruntime backend"
        )


def compile_properties(options: OpenVinoOptions) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": OV_PRECISIONS[options.precision],
        "PERFORMANCE_HINT": "LATENCY",  # one request at a time, every core on it
    }
    if options.threads is not None:
        properties["INFERENCE_NUM_THREADS"] = options.threads
    return properties


class OvGraph:
    """One compiled network behind the Graph interface; outputs are copies the caller owns."""

    def __init__(self, compiled: Any, spec: GraphSpec, path: Path, precision: Precision) -> None:
        check_interface(compiled, spec, path)
        self.spec = spec
        self.providers = [f"openvino:CPU:{precision.value}"]
        self.loaded_from = path
        self._request = compiled.create_infer_request()
        self._outputs = {name: compiled.output(name) for name in spec.output_names}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check feeds against the spec, infer, return float32 arrays by the spec's output names."""
        check_inputs(self.spec, feeds)
        results = self._request.infer(
            {name: np.ascontiguousarray(feeds[name]) for name in self.spec.input_names}
        )
        outputs = {name: np.array(results[port], copy=True) for name, port in self._outputs.items()}
        bad = nonfinite_names(outputs)  # here for OpenVINO's own hint; the pipeline checks every backend
        if bad:
            raise EngineError(
                f"{self.spec.network.value}: OpenVINO ({self.providers[0]}) returned non-finite values in "
                f"{bad}; {self._hint}"
            )
        return outputs

    @property
    def _hint(self) -> str:
        if self.providers[0].endswith(Precision.FP32.value):
            return OVERFLOW_HINT
        return "run this model with precision=fp32 or the onnxruntime backend (bf16 overflows sooner)"


def check_interface(compiled: Any, spec: GraphSpec, path: Path) -> None:
    """A graph whose input or output names differ from its spec belongs to another engine version."""
    inputs = [port.get_any_name() for port in compiled.inputs]
    outputs = {name for port in compiled.outputs for name in port.get_names()}
    missing = [name for name in spec.output_names if name not in outputs]
    if sorted(inputs) != sorted(spec.input_names) or missing:
        raise EngineFolderError(
            f"{path} does not match the {spec.network.value} spec: graph inputs {inputs}, spec inputs "
            f"{spec.input_names}; spec outputs missing from the graph {missing}"
        )


def open_engine(
    engine_dir: Path, manifest: Manifest, options: Mapping[str, Any]
) -> Callable[[Network], Graph]:
    """A loader of the engine folder's standard ONNX graphs compiled by OpenVINO for the CPU (options:
    see :class:`OpenVinoOptions`); a folder exported ``--torch-only`` has none: one-line EngineFolderError."""
    require_onnx(engine_dir, manifest, "the openvino backend")
    opts = parse_backend_options(OpenVinoOptions, options, "openvino")
    check_options(opts)
    ov = import_openvino()
    core = ov.Core()
    check_precision(core, opts.precision)
    if opts.cache:
        cache = Path(engine_dir) / CACHE_SUBDIR
        cache.mkdir(parents=True, exist_ok=True)
        core.set_property("CPU", {"CACHE_DIR": str(cache)})
    properties = compile_properties(opts)

    def load(network: Network) -> Graph:
        entry = manifest.graphs[network]
        path = Path(engine_dir) / entry.file  # the standard graph: OpenVINO fuses attention itself
        try:
            compiled = core.compile_model(str(path), "CPU", properties)
        except RuntimeError as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise EngineFolderError(f"OpenVINO cannot compile {path}: {first_line}") from None
        return OvGraph(compiled, entry.spec, path, opts.precision)

    return load
