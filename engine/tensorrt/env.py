"""The TensorRT environment: tensorrt, cuda-python and the GPU, imported only when called.

cuda-python comes in two handle APIs, and this module is the one place that knows both:

- 12.x: the runtime is ``cuda.bindings.runtime`` (12.6.1+; ``cuda.cudart`` before that, a deprecated
  alias after), and ``int(handle)`` is a handle's address;
- 13.x (cuda-bindings 13, CUDA 13 drivers, R580+): ``cuda.cudart`` is gone, and ``int(handle)`` is
  deprecated in favour of ``cuda.bindings.utils.get_cuda_native_handle`` (which 12.9 has too).

The runtime calls the backend makes (cudaMalloc/MallocHost, cudaMemcpyAsync, events, stream capture,
cudaGraphInstantiate(graph, flags), cudaGetDeviceProperties' name/major/minor/totalGlobalMem) have the
same signatures in both (checked against the 12.9.10, 13.0.3 and 13.5.0 wheels); CUDA 13 removed
other cudaDeviceProp fields (clockRate, computeMode, ...), which nothing here reads. Every handle that
leaves cuda-python as an int (for TensorRT's ``execute_async_v3``) goes through :func:`native_handle`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from engine.errors import EngineError, MissingDependencyError
from engine.tensorrt.plans import GpuInfo

log = logging.getLogger(__name__)


MAX_KEPT_ERRORS = 50  # TensorRT errors kept for the next failure message


TRT_INSTALL_HINT = 'pip install "sd-engine[tensorrt]"'
# The extra per CUDA major of the driver (pyproject.toml): what to install when one does not fit.
TRT_EXTRAS = {12: "sd-engine[tensorrt]", 13: "sd-engine[tensorrt-cu13]"}
TRT_INSTALL_HINTS = (
    f'{TRT_INSTALL_HINT} (CUDA 12 builds: R525+ drivers) or pip install "{TRT_EXTRAS[13]}" (CUDA 13 '
    "builds: R580+ drivers)"
)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed (import tensorrt failed): {TRT_INSTALL_HINTS} on a machine with "
            "an NVIDIA GPU"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime API module: ``cuda.bindings.runtime`` (12.6.1+ and 13.x), else the 12.x
    ``cuda.cudart``. MissingDependencyError (one line) when neither imports."""
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        try:
            from cuda import cudart as runtime
        except ImportError:
            missing = isinstance(error, ModuleNotFoundError) and str(error.name).startswith("cuda")
            why = "is not installed" if missing else f"cannot be imported ({' '.join(str(error).split())})"
            raise MissingDependencyError(
                f"cuda-python {why} (import cuda.bindings / cuda.cudart failed): {TRT_INSTALL_HINTS}"
            ) from None
    return runtime


def cuda_python_version() -> str:
    """The installed cuda-python bindings' version, e.g. ``"13.0.3"`` (for records and messages):
    ``cuda.bindings.__version__``, or the cuda-python distribution's before cuda.bindings existed."""
    try:
        from cuda import bindings

        return str(bindings.__version__)
    except (ImportError, AttributeError):
        pass
    try:
        return importlib.metadata.version("cuda-python")
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"cuda-python is not installed: {TRT_INSTALL_HINTS}") from None


def cuda_python_major() -> int:
    """12 or 13: which handle API (and which pyproject extra) the installed cuda-python belongs to."""
    return int(cuda_python_version().split(".")[0])


def native_handle(handle: Any) -> int:
    """The address a cuda-python handle wraps (cudaStream_t, cudaEvent_t, cudaGraph_t, ...), as a
    Python int, the form TensorRT's ``execute_async_v3`` and ``set_optimization_profile_async`` take.

    Uses ``cuda.bindings.utils.get_cuda_native_handle`` where it exists (cuda-bindings 12.9+, 13.x,
    where ``int(handle)`` is deprecated), ``int(handle)`` before. Plain ints (cudaMalloc's device
    pointers) pass through. TypeError for an object that is no cuda-python handle.
    """
    if isinstance(handle, int):
        return handle
    return int(_native_handle_getter()(handle))


@functools.cache
def _native_handle_getter() -> Callable[[Any], int]:
    """Looked up once: a failed import is not cached by Python, and this runs at every launch."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int
    return get_cuda_native_handle


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple; EngineError naming the call on failure."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        raise EngineError(f"CUDA call {what} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def detect_gpu(cudart: Any, device: int = 0) -> GpuInfo:
    """Name, compute capability and memory of one GPU.

    MissingDependencyError (one line) when there is none, saying whether no driver is loaded or the
    driver's CUDA major is older than the installed cuda-python's (then naming the extra that fits);
    EngineError for a device index that does not exist.
    """
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or not count:
        raise MissingDependencyError(no_gpu_reason(cudart, error))
    if not 0 <= device < count:
        raise EngineError(f"CUDA device {device} does not exist (this machine has {count})")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\0 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def no_gpu_reason(cudart: Any, error: Any) -> str:
    """Why cudaGetDeviceCount found no GPU (error: its status), as one line."""
    needs = "TensorRT needs an NVIDIA GPU and driver"
    if int(error) == 0:
        return f"no CUDA GPU found (cudaGetDeviceCount: 0 devices); {needs}"
    name = getattr(error, "name", str(error))
    driver = _cuda_version(cudart.cudaDriverGetVersion())  # 0 when no driver is loaded
    runtime = _cuda_version(cudart.cudaRuntimeGetVersion())  # the CUDA runtime inside cuda-python
    if driver == 0:
        return f"no CUDA GPU found: no NVIDIA driver is loaded (cudaGetDeviceCount: {name}); {needs}"
    if driver // 1000 < runtime // 1000:
        fits = TRT_EXTRAS.get(driver // 1000)
        switch = f'; pip install "{fits}" for this driver' if fits else ""
        return (
            f"the NVIDIA driver supports CUDA {_dotted(driver)}, older than the CUDA {_dotted(runtime)} "
            f"runtime of the installed cuda-python (cudaGetDeviceCount: {name}){switch}"
        )
    return f"no CUDA GPU found (cudaGetDeviceCount: {name}; driver CUDA {_dotted(driver)}); {needs}"


def _cuda_version(result: Any) -> int:
    """cudaDriverGetVersion / cudaRuntimeGetVersion as an int (12040 for 12.4), 0 on failure."""
    error, version = result
    return int(version) if int(error) == 0 and version is not None else 0


def _dotted(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def check_environment(device: int = 0, for_build: bool = False) -> tuple[Any, Any, GpuInfo]:
    """tensorrt, cuda-python's runtime and the GPU, or one line saying which is missing.

    for_build: polygraphy too (the builder's parity gate runs TensorRT and ONNX Runtime through it);
    running a built plan does not need it.
    """
    trt = import_tensorrt()
    cudart = import_cudart()
    if for_build:
        try:
            import polygraphy  # noqa: F401
        except ImportError:
            raise MissingDependencyError(f"polygraphy is not installed: {TRT_INSTALL_HINTS}") from None
    gpu = detect_gpu(cudart, device)
    cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
    # Plans whose ONNX used plugin ops (e.g. GroupNorm in some exports) need the plugin registry.
    trt.init_libnvinfer_plugins(trt_logger(trt), "")
    return trt, cudart, gpu


@functools.cache
def trt_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors for the failure message and forwards warnings to logging.

    One per process: TensorRT registers the first logger it sees globally and warns about others.
    """

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.count = 0  # errors logged so far, trimmed ones included

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                self.count += 1
                del self.errors[:-MAX_KEPT_ERRORS]  # a long-running service logs through this one too
                log.error("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("tensorrt: %s", msg)
            else:
                log.debug("tensorrt: %s", msg)

    return Logger()


def error_count(logger: Any) -> int:
    """How many errors a :func:`trt_logger` logger has logged so far (0 without one)."""
    return int(getattr(logger, "count", 0))


def errors_since(logger: Any, before: int, failure: BaseException | None = None) -> str:
    """``": <errors>"``: what TensorRT logged since :func:`error_count` was ``before``, plus a binding's
    exception text, on one line; "" when there is nothing to add."""
    new = error_count(logger) - before
    kept: list[str] = list(getattr(logger, "errors", []))
    messages = kept[-new:] if new > 0 else []
    if failure is not None:
        messages.append(str(failure))
    if not messages:
        return ""
    return ": " + "; ".join(" ".join(str(message).split()) for message in messages)
