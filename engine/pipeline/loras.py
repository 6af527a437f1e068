"""LoRAs at run time: which LoRAs a request wants, and the patched graphs that apply them.

A request names LoRAs by ``<lora:NAME:TE:UNET>`` tags in its prompts and by its ``loras`` setting
(a file stem or ``ss_output_name`` alias in the pipeline's ``lora_dir``, or a file path). Tags are read
from the positive prompts only, as A1111 does; every prompt of one request must name the same LoRAs.
The same LoRA named twice has its multipliers added.

Weights are merged on the host (W' = W + sum m * delta, see :mod:`engine.adapters`) from the exported
weights the backend reads back, and the backend loads the network with them (:class:`Patchable`). ONNX
Runtime makes a new session beside the base graph (one per network kept in memory; its optimized form
cached on disk under the LoRA set's identity), so switching back to no LoRA (the base graph, never
touched) is exact and free; torch and TensorRT patch the one loaded graph in place, restoring exported
weights the new set does not touch. A LoRA set is identified by its files' content hashes, so a file
replaced on disk is never served from a stale graph or embedding.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.adapters import (
    AdapterError,
    Component,
    LoraFile,
    LoraMatch,
    find_lora,
    lora_hash,
    match_lora,
    merge_weight,
    read_lora,
)
from engine.backends.weights import Merge, Patchable
from engine.hashing import json_digest
from engine.machine import release_freed_memory
from engine.manifest import Manifest
from engine.runtime import Graph, GraphLoader
from engine.specs import Network
from engine.text.prompt import ExtraNetwork, extract_extra_networks

log = logging.getLogger(__name__)

# Networks a LoRA patches, and the component whose multiplier applies to each.
LORA_COMPONENTS = {
    Network.TEXT_ENCODER: Component.TEXT_ENCODER,
    Network.TEXT_ENCODER_2: Component.TEXT_ENCODER_2,
    Network.UNET: Component.UNET,
    Network.UNET_CFG: Component.UNET,
}
LORA_KINDS = ("lora", "lyco")  # A1111 reads LyCORIS's old <lyco:...> tags as LoRAs
PATCHED_GRAPHS_KEPT = 1  # patched graphs kept per network (ONNX Runtime: each a session of its own)
SHORT_HASH = 12  # hex digits of A1111's `Lora hashes` entries


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a request: the name it was asked by, its file and the file's content (addnet) hash,
    and its two multipliers."""

    name: str
    path: Path
    digest: str
    te: float
    unet: float

    def multiplier(self, component: Component) -> float:
        return self.unet if component is Component.UNET else self.te


@dataclass(frozen=True)
class LoraSet:
    """The LoRAs of one request, in the order named (empty: the exported weights)."""

    uses: tuple[LoraUse, ...] = ()

    def key(self, component: Component) -> tuple[tuple[str, float], ...]:
        """What a component's weights depend on: (file content hash, multiplier) of each LoRA that
        touches it."""
        return tuple(
            (use.digest, use.multiplier(component)) for use in self.uses if use.multiplier(component)
        )


def tag_triples(prompts: Sequence[str]) -> tuple[tuple[str, float, float], ...]:
    """The (name, te, unet) of every ``<lora:...>`` tag of the prompts; AdapterError when prompts of one
    request name different LoRAs, or for a tag of another kind or with more than two multipliers."""
    per_prompt = {tuple(_tag_triple(tag) for tag in extract_extra_networks(p)[1]) for p in prompts}
    if len(per_prompt) > 1:
        raise AdapterError(
            "the prompts of one request name different LoRAs in <lora:...> tags; send separate requests"
        )
    return next(iter(per_prompt), ())


def _tag_triple(tag: ExtraNetwork) -> tuple[str, float, float]:
    if tag.kind not in LORA_KINDS:
        raise AdapterError(
            f"{tag.text}: unsupported extra network {tag.kind!r}; sd-engine applies <lora:...> tags"
        )
    numbers = tag.multipliers
    if len(numbers) > 2:
        raise AdapterError(f"{tag.text}: a LoRA tag takes at most two multipliers (text encoder, UNet)")
    te = numbers[0] if numbers else 1.0
    return tag.name, te, numbers[1] if len(numbers) > 1 else te


class LoraRuntime:
    """A pipeline's LoRA state: resolves names to files, merges weights, keeps patched graphs."""

    def __init__(self, manifest: Manifest, loader: GraphLoader, lora_dir: Path | None) -> None:
        self.manifest = manifest
        self.loader = loader
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise AdapterError(f"lora_dir {self.lora_dir} is not a folder")
        self._files: dict[tuple[str, int, int], tuple[LoraFile, str]] = {}
        self._matches: dict[str, LoraMatch] = {}
        self._graphs: dict[Network, OrderedDict[tuple, Graph]] = {}
        self._applied: dict[Network, tuple] = {}
        self._changed = False  # whether the last graphs() call made or patched a graph

    # -- which LoRAs ----------------------------------------------------------------------------

    def resolve(self, prompts: Sequence[str], extra: Sequence[tuple[str, float, float]]) -> LoraSet:
        """The LoRAs of a request: prompt tags (names in lora_dir only: a prompt never reaches other
        files), then ``extra`` (its ``loras``: names or file paths); one file named twice sums. A file
        given by path is named by its stem (in ``Lora hashes``)."""
        found = [(name, self.find_name(name), te, unet) for name, te, unet in tag_triples(prompts)]
        for name, te, unet in extra:
            path = self.find(name)
            found.append((path.stem if self.is_path(name) else name, path, te, unet))
        merged: dict[Path, LoraUse] = {}
        for name, path, te, unet in found:
            old = merged.get(path)
            total = (te + old.te, unet + old.unet) if old else (te, unet)
            merged[path] = LoraUse(old.name if old else name, path, self._file(path)[1], *total)
        return LoraSet(tuple(merged.values()))

    def tags(self, extra: Sequence[tuple[str, float, float]]) -> str:
        """A1111 tags for LoRAs given outside the prompt (``loras=``, ``--lora``), for the infotext's prompt
        so it reproduces the image: ``<lora:NAME:W>`` or ``<lora:NAME:TE:UNET>`` (NAME: the file stem for
        a path)."""
        tags = []
        for name, te, unet in extra:
            label = Path(os.path.expanduser(name)).stem if self.is_path(name) else name
            weights = f"{te:g}" if te == unet else f"{te:g}:{unet:g}"
            tags.append(f"<lora:{label}:{weights}>")
        return " ".join(tags)

    @staticmethod
    def is_path(name: str) -> bool:
        """Whether a ``loras`` entry names a file by path (it has a suffix and the file exists)."""
        candidate = Path(os.path.expanduser(name))
        return bool(candidate.suffix) and candidate.is_file()

    def find(self, name: str) -> Path:
        """A LoRA file by path, or by name in lora_dir (AdapterError when there is neither; a name that
        looks like a path, with a folder or a .safetensors suffix, and is no file says so)."""
        if self.is_path(name):
            return Path(os.path.expanduser(name)).resolve()
        looks_like_path = os.sep in name or name.lower().endswith(".safetensors")
        if looks_like_path and (self.lora_dir is None or os.sep in name):
            raise AdapterError(f"LoRA file not found: {name}")
        return self.find_name(name)

    def find_name(self, name: str) -> Path:
        """A LoRA file by file stem or alias in lora_dir (AdapterError without a lora_dir or a match)."""
        if self.lora_dir is None:
            raise AdapterError(
                f"no LoRA named {name!r}: no lora_dir to look it up in (Pipeline.load(..., lora_dir=DIR), "
                "--lora-dir)"
            )
        return find_lora(name, self.lora_dir).resolve()

    def hashes(self, loras: LoraSet) -> str | None:
        """A1111's ``Lora hashes`` value: "name: <12 hex>, ..." (None without LoRAs)."""
        if not loras.uses:
            return None
        return ", ".join(f"{use.name}: {use.digest[:SHORT_HASH]}" for use in loras.uses)

    # -- graphs ---------------------------------------------------------------------------------

    def graphs(self, loras: LoraSet, networks: Sequence[Network]) -> dict[Network, Graph]:
        """Patched graphs of the ``networks`` a request runs that ``loras`` changes; a network left
        alone is not in the result (the caller uses its base graph). A loader that patches in place
        (its graphs may share weights, as torch's unet and unet_cfg do) is brought to ``loras`` on
        every LoRA network of the engine. AdapterError for a backend that cannot patch."""
        wanted = [n for n in networks if n in LORA_COMPONENTS and loras.key(LORA_COMPONENTS[n])]
        if not wanted and not self._applied:
            return {}
        if self._loader().in_place:
            networks = [n for n in LORA_COMPONENTS if n in self.manifest.graphs]
        self._changed = False
        graphs = {n: graph for n in networks if (graph := self._graph(n, loras)) is not None}
        if self._changed:  # a session was made or weights rewritten: gigabytes came and went
            release_freed_memory()
        return graphs

    def _loader(self) -> Patchable:
        if not isinstance(self.loader, Patchable):
            raise AdapterError(
                "this backend cannot apply LoRAs; use --backend onnxruntime, torch or tensorrt"
            )
        return self.loader

    def _graph(self, network: Network, loras: LoraSet) -> Graph | None:
        """The network's patched graph (None: its base graph serves, also when the LoRAs touch none of
        its weights). In-place loaders are patched (or restored) only when the network's LoRA key
        changes; the pipeline keeps using its own graph."""
        component = LORA_COMPONENTS.get(network)
        key = loras.key(component) if component else ()
        loader = self._loader()
        if loader.in_place:
            if self._applied.get(network, ()) != key:
                targets, merge = self._merge(network, loras) if key else ([], _no_merge)
                loader.load_patched(network, targets, merge)
                self._applied[network] = key
                self._changed = True
            return None
        if not key:
            return None
        targets, merge = self._merge(network, loras)
        if not targets:  # e.g. a UNet-only LoRA's text encoders: the base graph, not a copy of it
            return None
        kept = self._graphs.setdefault(network, OrderedDict())
        if key not in kept:
            while len(kept) >= PATCHED_GRAPHS_KEPT:  # make room first: one patched graph less at the peak
                kept.popitem(last=False)
            kept[key] = loader.load_patched(network, targets, merge, self._identity(component, loras))
            self._changed = True
        kept.move_to_end(key)
        return kept[key]

    @staticmethod
    def _identity(component: Component, loras: LoraSet) -> str:
        """What a component's merged weights depend on, for the on-disk cache: its LoRA key."""
        return json_digest(["sd-engine-lora-1", [list(use) for use in loras.key(component)]])

    def _merge(self, network: Network, loras: LoraSet) -> tuple[list[str], Merge]:
        """The targets the LoRAs touch in this network, and the function giving each one's merged
        weight (torch layout) from the exported one: W + sum of multiplier * delta."""
        component = LORA_COMPONENTS[network]
        parts: dict[str, list] = {}
        for use in loras.uses:
            multiplier = use.multiplier(component)
            if not multiplier:
                continue
            for delta in self._match(use).deltas:
                if delta.target[0] is component:
                    parts.setdefault(_target_key(delta.target), []).append((delta, multiplier))
        targets = self._loader().lora_targets(network)
        missing = [t for t in parts if t not in targets]
        if missing:
            raise AdapterError(
                f"{len(missing)} LoRA weights (e.g. {missing[0]}) have no patchable weight in the "
                f"{network.value} graph; re-export the model with this sd-engine"
            )
        return list(parts), lambda target, base: merge_weight(base, parts[target])

    def _match(self, use: LoraUse) -> LoraMatch:
        """The file's deltas against every patchable target of the engine (cached per file content)."""
        path, digest = use.path, use.digest
        if digest not in self._matches:
            lora = self._file(path)[0]
            match = match_lora(lora, self._all_targets(), self.manifest.model_family)
            if match.unused_keys:
                log.warning(
                    "LoRA %s: %d keys match nothing in this model and are not applied (e.g. %s)",
                    path.name,
                    len(match.unused_keys),
                    ", ".join(match.unused_keys[:3]),
                )
            self._matches[digest] = match
        return self._matches[digest]

    def _all_targets(self) -> dict[tuple[Component, str], tuple[int, ...]]:
        loader = self._loader()
        targets: dict[tuple[Component, str], tuple[int, ...]] = {}
        for network in (Network.TEXT_ENCODER, Network.TEXT_ENCODER_2, Network.UNET):
            if network in self.manifest.graphs:
                for target, shape in loader.lora_targets(network).items():
                    component, module = target.split(":", 1)
                    targets[(Component(component), module)] = tuple(shape)
        if not targets:
            raise AdapterError(
                "this engine folder records no LoRA weight map (exported before LoRA support); re-export "
                "the model with this sd-engine"
            )
        return targets

    def _file(self, path: Path) -> tuple[LoraFile, str]:
        """The parsed file and its addnet hash, re-read when the file changes (size or mtime)."""
        try:
            stat = path.stat()
        except OSError as error:
            raise AdapterError(f"cannot read LoRA {path}: {error.strerror}") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = (read_lora(path), lora_hash(path))
        return self._files[key]


def _no_merge(target: str, base: np.ndarray) -> np.ndarray:
    raise AssertionError(f"no target is merged when LoRAs are switched off ({target})")


def _target_key(target: tuple[Component, str]) -> str:
    return f"{target[0].value}:{target[1]}"


def te_key(loras: LoraSet) -> tuple:
    """What text embeddings depend on besides the prompt: the text-encoder LoRAs."""
    return loras.key(Component.TEXT_ENCODER)
