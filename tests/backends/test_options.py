"""Backend options: one vocabulary (device, cuda_graph, precision), enum values by name, one-line errors
that list what is valid; the backend registry that reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.backends.onnxruntime import OrtOptions
from engine.backends.openvino import OpenVinoOptions
from engine.backends.options import CPU, Device, DeviceKind, Switch, parse_backend_options
from engine.backends.tensorrt import TrtOptions
from engine.backends.torch_cpu import TorchOptions
from engine.backends.torch_cuda import TorchCudaOptions
from engine.errors import EngineError
from engine.runtime import BACKENDS, BackendName, backend_names, open_backend
from engine.specs import Precision

ALL_OPTIONS = (OrtOptions, TrtOptions, TorchOptions, TorchCudaOptions, OpenVinoOptions)


def test_enum_fields_are_taken_by_value_and_switches_by_bool() -> None:
    options = parse_backend_options(OrtOptions, {"device": "cpu", "cuda_graph": False}, "x")
    assert options.device == CPU and options.cuda_graph is Switch.OFF
    assert parse_backend_options(OrtOptions, {"device": None}, "x").device is None
    assert parse_backend_options(OrtOptions, {"io_binding": None}, "x").io_binding is Switch.AUTO
    assert parse_backend_options(TrtOptions, {"cuda_graph": "on"}, "x").cuda_graph is Switch.ON
    assert parse_backend_options(OpenVinoOptions, {"precision": "fp32"}, "x").precision is Precision.FP32


@pytest.mark.parametrize(
    ("text", "device"),
    [
        ("cpu", Device(DeviceKind.CPU)),
        ("cuda", Device(DeviceKind.CUDA)),
        (" CUDA:2 ", Device(DeviceKind.CUDA, 2)),
    ],
)
def test_devices_are_spelled_one_way(text: str, device: Device) -> None:
    assert Device.parse(text) == device
    assert str(Device.parse(str(device))) == str(device)


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu:1", "cuda:-1", ""])
def test_bad_devices_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not cpu, cuda or cuda:N"):
        Device.parse(text)


def test_every_backend_speaks_the_shared_vocabulary() -> None:
    for cls in ALL_OPTIONS:
        names = {field for field in cls.__dataclass_fields__}
        assert "device" in names, cls.__name__
    for cls in (OrtOptions, TrtOptions, TorchCudaOptions):
        assert cls.__dataclass_fields__["cuda_graph"].type == "Switch", cls.__name__
    for cls in (TorchOptions, TorchCudaOptions, OpenVinoOptions):
        assert "precision" in cls.__dataclass_fields__, cls.__name__


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"device": "tpu"}, "device 'tpu' is not cpu, cuda or cuda:N"),
        ({"cuda_graph": "sometimes"}, "'sometimes' is not a valid Switch"),
        ({"intra_op_threads": 2}, "(unknown option intra_op_threads)"),
    ],
)
def test_bad_options_name_the_valid_ones(options: dict, needle: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_backend_options(OrtOptions, options, "onnxruntime")
    message = str(info.value)
    assert message.startswith("bad onnxruntime backend options") and needle in message
    assert "valid: device, threads" in message
    assert "cuda_graph: auto, on, off" in message and "\n" not in message


def test_names_are_declared_once() -> None:
    assert backend_names() == [name.value for name in BackendName] == [name.value for name in BACKENDS]
    assert backend_names(DeviceKind.CPU) == ["onnxruntime", "torch", "openvino"]
    assert backend_names(DeviceKind.CUDA) == ["onnxruntime", "torch-cuda", "tensorrt"]
    assert BackendName.OPENVINO.runs_on_cpu and not BackendName.OPENVINO.has_cuda_graphs
    assert BackendName.TENSORRT.has_cuda_graphs and not BackendName.TENSORRT.runs_on_cpu
    from engine.pipeline import BackendName as reexported

    assert reexported is BackendName


def test_every_backend_module_has_the_one_opener() -> None:
    import importlib
    import inspect

    for name, info in BACKENDS.items():
        opener = importlib.import_module(info.module).open_engine
        assert list(inspect.signature(opener).parameters) == ["engine_dir", "manifest", "options"], name


def test_unknown_backend_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown backend 'onnx'; valid backends: onnxruntime, torch"):
        open_backend("onnx", tmp_path, None)  # type: ignore[arg-type]


def test_the_registry_imports_no_backend() -> None:
    code = "import sys, engine.runtime; print([m for m in sys.modules if m.startswith('engine.backends.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['engine.backends.options']"
