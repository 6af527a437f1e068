"""Engine folders that take some graphs from another export of the very same networks.

A tiny UNet export takes most of a minute on CI's 2 cores. A test whose model differs from an already
exported one only in some networks (its tokenizer files, its text encoder's key names) exports those
for real and takes the other graphs from the other engine, after checking that export would load the
same networks from both models: the same config and bit-identical float32 weights. The folder then
holds what its own full export would: graphs of the same modules, each parity-gated when it was made.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from engine.export import ExportResult, ExportSettings, export_model
from engine.manifest import GraphEntry, read_manifest, write_manifest
from engine.models.source import SourceOptions, open_model_source
from engine.specs import Network, graph_specs

# The SourceModel field each network is exported from.
COMPONENT = {
    Network.TEXT_ENCODER: "text_encoder",
    Network.UNET: "unet",
    Network.UNET_CFG: "unet",
    Network.VAE_DECODER: "vae",
    Network.VAE_ENCODER: "vae",
}


def _config(module: torch.nn.Module) -> dict[str, Any]:
    """A module's architecture config as JSON values, without diffusers' bookkeeping keys (``_*``)."""
    config = module.config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps({k: v for k, v in data.items() if not k.startswith("_")}, default=str))


def assert_same_networks(
    model: Path, donor: Path, networks: Iterable[Network], options: SourceOptions | None = None
) -> None:
    """AssertionError unless export would load ``networks`` of ``model`` (read with ``options``) and of
    the ``donor`` folder as the same modules: equal configs, the same weight names, equal float32 values."""
    ours = open_model_source(model, options or SourceOptions()).load()
    theirs = open_model_source(donor, SourceOptions()).load()
    for component in sorted({COMPONENT[network] for network in networks}):
        mine, other = getattr(ours, component), getattr(theirs, component)
        assert _config(mine) == _config(other), f"{component}: configs differ"
        weights, expected = mine.state_dict(), other.state_dict()
        assert weights.keys() == expected.keys(), f"{component}: weight names differ"
        for name, tensor in weights.items():
            same = tensor.dtype == torch.float32 and torch.equal(tensor, expected[name])
            assert same, f"{component}.{name}"


def graph_files(entry: GraphEntry) -> set[str]:
    """Every file of the engine folder that ``entry`` names: graph, external data, variant, the files
    its LoRA weight map points into."""
    files = {entry.file, entry.external_data, *(ref.file for ref in entry.weights.values())}
    if entry.onnxruntime is not None:
        files |= {entry.onnxruntime.file, *(ref.file for ref in entry.onnxruntime.weights.values())}
    return {file for file in files if file is not None}


def export_reusing(
    model: Path,
    engine_dir: Path,
    donor_model: Path,
    donor_engine: Path,
    reuse: tuple[Network, ...],
    options: SourceOptions | None = None,
    exported: tuple[Network, ...] = (Network.TEXT_ENCODER,),
) -> ExportResult:
    """``export_model(model, engine_dir)`` of ``exported`` plus the ``reuse`` graphs of ``donor_engine``
    (exported from the ``donor_model`` folder), once :func:`assert_same_networks` holds for them.

    The manifest is the export's own (source, scheduler, tokenizer) with the donor's graph entries
    (files, hashes, parity records) added; their specs must be the ones this model's dims give.
    """
    assert not set(reuse) & set(exported), "a network is either exported or reused"
    assert_same_networks(model, donor_model, reuse, options)
    donor = read_manifest(donor_engine)
    result = export_model(model, engine_dir, ExportSettings(networks=exported), options=options)
    manifest = result.manifest
    assert manifest.dims == donor.dims, (manifest.dims, donor.dims)
    specs = graph_specs(manifest.dims)
    graphs = dict(manifest.graphs)
    for network in reuse:
        entry = donor.graphs[network]
        assert entry.spec == specs[network], network
        for file in graph_files(entry):
            shutil.copyfile(donor_engine / file, result.engine_dir / file)
        graphs[network] = entry
    manifest = dataclasses.replace(manifest, graphs={n: graphs[n] for n in Network if n in graphs})
    write_manifest(result.engine_dir, manifest)
    return dataclasses.replace(result, manifest=read_manifest(result.engine_dir))
