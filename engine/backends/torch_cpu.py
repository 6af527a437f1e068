"""The torch backend: the source model's own torch modules behind the runtime's Graph interface.

It is the reference path (same loop, same NumPy schedulers, only the networks differ) and the GPU
fallback. Imported only when chosen: it needs torch, diffusers and the source model folder that
the manifest records.

``compile=True`` runs the UNet (``unet`` and ``unet_cfg``) through ``torch.compile`` (TorchInductor;
on the CPU its C++ backend, which needs a C++ compiler such as g++). Compilation happens on the first
call, which :attr:`TorchGraph.compile_s` times. The text encoder and VAE stay eager. The same helpers
(:data:`COMPILE_MODES`, :func:`compile_module`) serve the torch-cuda backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.backends.options import CPU, Device, DeviceKind, parse_backend_options
from engine.backends.weights import Merge
from engine.errors import EngineError, MissingDependencyError
from engine.manifest import Manifest
from engine.specs import GraphSpec, Network, Precision, check_inputs

if TYPE_CHECKING:
    from engine.runtime import Graph


# torch.compile's modes that leave CUDA graphs alone: the torch-cuda backend captures its own CUDA graph
# around the compiled UNet, and "reduce-overhead" / "max-autotune" would capture theirs inside it.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
COMPILED_NETWORKS = (Network.UNET, Network.UNET_CFG)


def check_compile_mode(mode: str) -> None:
    """ValueError (one line, naming the valid modes) unless ``mode`` is one of :data:`COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"compile_mode {mode!r} is not one of {', '.join(COMPILE_MODES)} (the backend captures its own "
            "CUDA graph around the compiled UNet; reduce-overhead and max-autotune would nest theirs)"
        )


def compile_module(module: Any, mode: str) -> Any:
    """``torch.compile(module)`` with static shapes (``dynamic=False``: a new shape recompiles) and graph
    breaks allowed (``fullgraph=False``). Nothing compiles until the first call. The returned module
    shares ``module``'s parameters. ValueError for a mode outside :data:`COMPILE_MODES`."""
    check_compile_mode(mode)
    torch = _import_torch()
    return torch.compile(module, mode=mode, dynamic=False, fullgraph=False)


def check_compile_options(compile: object, mode: str) -> None:
    """A backend's ``compile`` (a bool) and ``compile_mode`` options; one-line ValueError otherwise."""
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be true or false, got {compile!r}")
    check_compile_mode(mode)


class FirstCallClock:
    """Times the first call of a compiled module (wall seconds, the caller synchronises the device):
    the compilation (tracing, lowering, kernel builds and autotuning) plus one run."""

    def __init__(self) -> None:
        self.seconds: float | None = None

    def call(self, fn: Callable[..., Any], *args: Any, sync: Callable[[], None] = lambda: None) -> Any:
        """fn(*args); the first call is timed, and its failure (TorchInductor or Triton: no C compiler,
        no Python.h, an unsupported op) becomes one EngineError line."""
        if self.seconds is not None:
            return fn(*args)
        start = time.perf_counter()
        try:
            out = fn(*args)
            sync()
        except Exception as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            first = lines[0] if lines else type(error).__name__
            message = f"torch.compile failed on the first call ({first}); run without compile"
            raise EngineError(message) from error
        self.seconds = time.perf_counter() - start
        return out


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            'the torch backend needs torch: pip install "sd-engine[export]"'
        ) from None
    return torch


class TorchGraph:
    """One wrapper module run on numpy inputs; outputs are fresh numpy arrays owned by the caller.

    compile_mode: run the module through :func:`compile_module` in that mode (None: eager); the
    first run compiles, and :attr:`compile_s` is its wall time in seconds (None before it).
    """

    def __init__(
        self, spec: GraphSpec, module: Any, device: str = "cpu", compile_mode: str | None = None
    ) -> None:
        self.spec = spec
        self.module = module
        self.device = device
        self.compiled = None if compile_mode is None else compile_module(module, compile_mode)
        self._clock = FirstCallClock()

    @property
    def providers(self) -> list[str]:
        """``torch:cpu``, with ``:compiled`` when torch.compile runs the module."""
        return [f"torch:{self.device}" + (":compiled" if self.compiled is not None else "")]

    @property
    def compile_s(self) -> float | None:
        """Wall seconds of the first compiled run (compilation plus one run); None if eager or not run yet."""
        return self._clock.seconds if self.compiled is not None else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _import_torch()
        check_inputs(self.spec, feeds)
        args = [
            torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            for name in self.spec.input_names
        ]
        with torch.inference_mode():
            out = self.module(*args) if self.compiled is None else self._clock.call(self.compiled, *args)
        outputs = out if isinstance(out, tuple) else (out,)
        return {
            name: value.float().cpu().numpy()
            for name, value in zip(self.spec.output_names, outputs, strict=True)
        }


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        source: Any,
        specs: Mapping[Network, GraphSpec],
        device: str = "cpu",
        compile_mode: str | None = None,
    ) -> None:
        self.source = source
        self.specs = specs
        self.device = device
        self.compile_mode = compile_mode
        self.weights = InPlaceWeights(self._lora_modules)

    def _lora_modules(self, network: Network) -> dict[str, Any]:
        from engine.models.torch_modules import lora_modules

        return lora_modules(self.source.wrapper(network))

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, device: str = "cpu", compile_mode: str | None = None
    ) -> TorchBackend:
        """Load the source model folder recorded in the manifest (it must still exist); compile_mode:
        torch.compile the UNet graphs in that mode (None: eager)."""
        _import_torch()
        from engine.models.torch_modules import load_source_from_manifest

        source = load_source_from_manifest(manifest)
        specs = {network: entry.spec for network, entry in manifest.graphs.items()}
        return cls(source, specs, device, compile_mode)

    def load(self, network: Network) -> TorchGraph:
        module = self.source.wrapper(network).to(self.device)
        mode = self.compile_mode if network in COMPILED_NETWORKS else None
        return TorchGraph(self.specs[network], module, self.device, mode)

    __call__ = load

    # -- LoRA (engine.backends.weights.Patchable): the source modules' weights change in place ------

    in_place = True

    def lora_targets(self, network: Network) -> dict[str, tuple[int, ...]]:
        return self.weights.targets(network)

    def load_patched(
        self, network: Network, targets: Collection[str], merge: Merge, identity: str | None = None
    ) -> TorchGraph:
        """Write the merged weights into the shared source modules (see :class:`InPlaceWeights`)."""
        self.weights.apply(network, targets, merge)
        return self.load(network)


class InPlaceWeights:
    """LoRA weights written into torch modules in place, for the torch backends.

    ``modules_of(network)`` gives the network's Linear / Conv2d modules by target (see
    :func:`engine.models.torch_modules.lora_modules`); networks may share modules (the unet and
    unet_cfg graphs do). The exported weight of every target ever patched is kept as an exact copy, so
    a target left out of a later patch, or a return to no LoRA, gets it back bit for bit.
    """

    def __init__(self, modules_of: Callable[[Network], Mapping[str, Any]]) -> None:
        self._modules_of = modules_of
        self._modules: dict[Network, Mapping[str, Any]] = {}
        self._originals: dict[str, Any] = {}  # target -> exported weight (a torch tensor copy)

    def modules(self, network: Network) -> Mapping[str, Any]:
        if network not in self._modules:
            self._modules[network] = self._modules_of(network)
        return self._modules[network]

    def targets(self, network: Network) -> dict[str, tuple[int, ...]]:
        return {target: tuple(m.weight.shape) for target, m in self.modules(network).items()}

    def apply(self, network: Network, targets: Collection[str], merge: Merge) -> None:
        """Targets get ``merge(target, exported weight as float32 NumPy)``; other targets of the network
        that were patched before get their exported weight back."""
        torch = _import_torch()
        with torch.no_grad():
            for target, module in self.modules(network).items():
                if target in targets:
                    original = self._originals.setdefault(target, module.weight.detach().clone())
                    value = torch.from_numpy(
                        np.ascontiguousarray(merge(target, original.float().cpu().numpy()))
                    )
                    module.weight.copy_(value.to(device=module.weight.device, dtype=module.weight.dtype))
                elif target in self._originals:
                    module.weight.copy_(self._originals.pop(target))


@dataclass(frozen=True)
class TorchOptions:
    """device: ``cpu`` (torch-cuda is the GPU backend); precision: fp32 only (the reference);
    compile: run the UNet through torch.compile (TorchInductor's C++ backend) in ``compile_mode``, one
    of :data:`COMPILE_MODES` (ValueError otherwise)."""

    device: Device = CPU
    precision: Precision = Precision.FP32
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        check_compile_options(self.compile, self.compile_mode)


def open_engine(
    engine_dir: Path, manifest: Manifest, options: Mapping[str, Any]
) -> Callable[[Network], Graph]:
    """A loader of the manifest's source networks in torch on the CPU (options: see :class:`TorchOptions`)."""
    opts = parse_backend_options(TorchOptions, options, "torch")
    if opts.device.kind is not DeviceKind.CPU or opts.precision is not Precision.FP32:
        raise EngineError(
            f"the torch backend runs fp32 on the cpu, not {opts.precision.value} on {opts.device}; "
            "use the torch-cuda backend for the GPU"
        )
    mode = opts.compile_mode if opts.compile else None
    return TorchBackend.from_manifest(manifest, str(opts.device), mode)
