"""The torch backend: the source model's own torch modules behind the runtime's Graph interface.

It is the reference path (same loop, same NumPy schedulers, only the networks differ) and the GPU
fallback. Imported only when chosen: it needs torch, diffusers and the source model folder that
the manifest records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.backends.options import CPU, Device, DeviceKind, parse_backend_options
from engine.errors import EngineError, MissingDependencyError
from engine.manifest import Manifest
from engine.specs import GraphSpec, Network, Precision, check_inputs

if TYPE_CHECKING:
    from engine.runtime import Graph


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            'the torch backend needs torch: pip install "sd-engine[export]"'
        ) from None
    return torch


@dataclass
class TorchGraph:
    """One wrapper module run on numpy inputs; outputs are fresh numpy arrays owned by the caller."""

    spec: GraphSpec
    module: Any
    device: str = "cpu"

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self.device}"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _import_torch()
        check_inputs(self.spec, feeds)
        args = [
            torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            for name in self.spec.input_names
        ]
        with torch.inference_mode():
            out = self.module(*args)
        outputs = out if isinstance(out, tuple) else (out,)
        return {
            name: value.float().cpu().numpy()
            for name, value in zip(self.spec.output_names, outputs, strict=True)
        }


class TorchBackend:
    name = "torch"

    def __init__(self, source: Any, specs: Mapping[Network, GraphSpec], device: str = "cpu") -> None:
        self.source = source
        self.specs = specs
        self.device = device

    @classmethod
    def from_manifest(cls, manifest: Manifest, device: str = "cpu") -> TorchBackend:
        """Load the source model folder recorded in the manifest (it must still exist)."""
        _import_torch()
        from engine.models.torch_modules import load_source_from_manifest

        source = load_source_from_manifest(manifest)
        specs = {network: entry.spec for network, entry in manifest.graphs.items()}
        return cls(source, specs, device)

    def load(self, network: Network) -> TorchGraph:
        module = self.source.wrapper(network).to(self.device)
        return TorchGraph(self.specs[network], module, self.device)


@dataclass(frozen=True)
class TorchOptions:
    """device: ``cpu`` (torch-cuda is the GPU backend); precision: fp32 only (the reference)."""

    device: Device = CPU
    precision: Precision = Precision.FP32


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
    return TorchBackend.from_manifest(manifest, str(opts.device)).load
