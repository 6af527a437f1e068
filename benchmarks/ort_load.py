"""ONNX Runtime load time with and without the optimized-graph cache of engine.runtime.

    python benchmarks/ort_load.py unet.onnx /tmp/ort-cache [--run batch=2,latent_height=32,...]

Times: a plain load (ORT_ENABLE_ALL in memory), the first cached load (optimize, save, reopen) and the
cached load (optimizations off, median of 3). With --run, also one inference per graph (median of 3),
to show the cached graph runs as fast. The graph's interface is read from the graph itself, so any
ONNX file works; a throwaway load first warms the page cache so disk reads do not favour later loads.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.backends.onnxruntime import (
    CACHED_MODEL,
    OnnxRuntimeBackend,
    OrtGraph,
    OrtOptions,
)
from engine.hashing import graph_content_hash
from engine.specs import GraphSpec, Network, TensorSpec, sample_inputs

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def spec_from_graph(path: Path, network: Network) -> GraphSpec:
    """The graph's own inputs/outputs as a spec (unnamed dynamic dims get placeholder names)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def tensor(node: ort.NodeArg) -> TensorSpec:
        dims = tuple(d if d is not None else f"{node.name}_{i}" for i, d in enumerate(node.shape))
        return TensorSpec(node.name, dims, _DTYPES.get(node.type, node.type))

    return GraphSpec(
        network,
        tuple(tensor(n) for n in session.get_inputs()),
        tuple(tensor(n) for n in session.get_outputs()),
    )


def timed(action: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def run_time(graph: OrtGraph, feeds: dict[str, np.ndarray]) -> float:
    graph.run(feeds)  # warm-up: arena growth, first-run allocations
    return statistics.median(timed(lambda: graph.run(feeds))[0] for _ in range(3))


def parse_sizes(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("graph", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--network", type=Network, default=Network.UNET)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run", type=parse_sizes, default=None, help="axis sizes, e.g. batch=2,sequence=77")
    args = parser.parse_args()

    backend = OnnxRuntimeBackend(OrtOptions(threads=args.threads))
    spec = spec_from_graph(args.graph, args.network)
    hash_s, digest = timed(lambda: graph_content_hash(args.graph))
    feeds = sample_inputs(spec, args.run, np.random.default_rng(0)) if args.run is not None else None
    print(f"onnxruntime {ort.__version__}, {backend.provider.value}, {backend.threads} intra-op threads")
    print(f"content hash of {args.graph} and its data files: {hash_s:.2f} s")

    plain_s, graph = timed(lambda: backend.load(args.graph, spec))
    plain_run = run_time(graph, feeds) if feeds else None
    del graph
    gc.collect()

    entry = args.cache_dir / f"{spec.network.value}-{backend.cache_key(args.graph, digest).digest()}"
    shutil.rmtree(entry, ignore_errors=True)
    first_s, graph = timed(lambda: backend.load(args.graph, spec, args.cache_dir, content_hash=digest))
    if graph.cache_hit or graph.loaded_from != entry / CACHED_MODEL:
        raise RuntimeError(f"the optimized graph was not written to {entry}")
    del graph
    gc.collect()

    cached = []
    for _ in range(3):
        seconds, graph = timed(lambda: backend.load(args.graph, spec, args.cache_dir, content_hash=digest))
        if not graph.cache_hit:
            raise RuntimeError(f"the cached graph in {entry} was not used")
        cached.append(seconds)
    cached_run = run_time(graph, feeds) if feeds else None
    size = sum(p.stat().st_size for p in entry.iterdir()) / 2**20

    print(f"plain load (ORT_ENABLE_ALL):          {plain_s:7.2f} s")
    print(f"first cached load (optimize + save):  {first_s:7.2f} s   -> {entry} ({size:.0f} MiB)")
    each = ", ".join(f"{seconds:.2f}" for seconds in cached)
    print(f"cached load (median of 3):            {statistics.median(cached):7.2f} s   ({each})")
    if feeds:
        print(f"run, plain graph (median of 3):       {plain_run:7.3f} s")
        print(f"run, cached graph (median of 3):      {cached_run:7.3f} s")


if __name__ == "__main__":
    main()
