"""The torch backend: the source model's own torch modules behind the runtime's Graph interface.

It is the reference path (same loop, same NumPy schedulers, only the networks differ) and the GPU
fallback. Imported only when chosen: it needs torch, diffusers and the source model folder that
the manifest records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineFolderError, MissingDependencyError
from engine.manifest import Manifest
from engine.specs import GraphSpec, Network, check_inputs


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
        from engine.models.folder import inspect_model_folder
        from engine.models.torch_modules import load_source_model

        model_dir = manifest.source.get("model_dir")
        if not model_dir or not Path(model_dir).is_dir():
            raise EngineFolderError(
                f"torch backend: the source model folder {model_dir!r} named in the manifest is gone"
            )
        source = load_source_model(inspect_model_folder(model_dir))
        specs = {network: entry.spec for network, entry in manifest.graphs.items()}
        return cls(source, specs, device)

    def load(self, network: Network) -> TorchGraph:
        module = self.source.wrapper(network).to(self.device)
        return TorchGraph(self.specs[network], module, self.device)
