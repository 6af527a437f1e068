"""The TensorRT environment: tensorrt, cuda-python and the GPU, imported only when called."""

from __future__ import annotations

import functools
import logging
from typing import Any

from engine.errors import EngineError, MissingDependencyError
from engine.tensorrt.plans import GpuInfo

log = logging.getLogger(__name__)


MAX_KEPT_ERRORS = 50  # TensorRT errors kept for the next failure message


TRT_INSTALL_HINT = 'pip install "sd-engine[tensorrt]"'


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed (import tensorrt failed): {TRT_INSTALL_HINT} on a machine with "
            "an NVIDIA GPU"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (13.x) or ``cuda.cudart`` (12.x)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise MissingDependencyError(
                "cuda-python is not installed (import cuda.bindings / cuda.cudart failed): "
                + TRT_INSTALL_HINT
            ) from None
    return runtime


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple; EngineError naming the call on failure."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        raise EngineError(f"CUDA call {what} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def detect_gpu(cudart: Any, device: int = 0) -> GpuInfo:
    """Name and compute capability of one GPU; one-line error when there is none."""
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count == 0:
        reason = getattr(error, "name", str(error)) if int(error) != 0 else "0 devices"
        raise MissingDependencyError(
            f"no CUDA GPU found (cudaGetDeviceCount: {reason}); TensorRT needs an NVIDIA GPU and driver"
        )
    if not 0 <= device < count:
        raise EngineError(f"CUDA device {device} does not exist (this machine has {count})")
    props = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\0 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


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
            raise MissingDependencyError(f"polygraphy is not installed: {TRT_INSTALL_HINT}") from None
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
