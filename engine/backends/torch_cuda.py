"""The torch backend on CUDA: fp16 networks, static buffers, and a captured CUDA graph for the UNet.

The same source modules as :mod:`engine.backends.torch_cpu` (the reference path), moved to the GPU: the text
encoder and UNet in fp16 behind a float32 boundary (graphs keep the spec's float32 inputs and outputs;
the timestep stays float32, as diffusers computes its embedding), the VAE in fp32 unless
``vae_precision`` asks for fp16 (with an fp32 rerun on overflow) or bf16. Every network runs through a
:class:`~engine.backends.cuda_graph.CudaGraphRunner` (static device buffers, pinned host staging, one private
CUDA stream); the UNet's runner captures a ``torch.cuda.CUDAGraph`` per shape and replays it.

Fused classifier-free guidance: the ``unet_cfg`` network is :class:`engine.models.torch_modules.GuidedUNet`
around the same fp16 UNet (shared weights, its own captured graph): B latents, 2B embeddings and the
guidance scale in, the guided noise out, so the duplication of the latents and the guidance combine
happen on the GPU and half as many latents cross the bus each step. The embeddings and the guidance
scale, bound once per generation, are copied to the GPU once, not at every step.

``compile=True``: the ``unet`` and ``unet_cfg`` modules are wrapped with ``torch.compile`` (TorchInductor,
Triton kernels; :func:`engine.backends.torch_cpu.compile_module`) in ``compile_mode``, a mode that
leaves CUDA graphs to us ("default" or "max-autotune-no-cudagraphs"). The runner's first warm-up launch
compiles (its wall time, synchronised, is :attr:`TorchCudaGraph.compile_s`); the capture that follows
the warm-up records the compiled kernels, so each replay runs them with one launch: the approach behind
stable-fast's numbers. The text encoder and VAE stay eager. Providers then read
``torch:cuda:0:fp16:compiled:cuda-graph``.

torch is imported inside functions: this module imports without it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.cuda_graph import CudaGraphRunner, GuardedGraph, graph_providers
from engine.backends.options import CUDA, Device, Switch, parse_backend_options
from engine.backends.torch_cpu import FirstCallClock, InPlaceWeights, check_compile_options, compile_module
from engine.backends.weights import Merge
from engine.errors import EngineFolderError, MissingDependencyError
from engine.manifest import Manifest
from engine.runtime import Graph
from engine.specs import (
    GraphSpec,
    Network,
    Precision,
    check_inputs,
)

log = logging.getLogger(__name__)

TORCH_CUDA_HINT = "install a CUDA build of torch on a machine with an NVIDIA GPU and driver"
# Inputs that stay float32 inside an fp16 module: diffusers embeds the timestep in float32.
FLOAT32_INPUTS = ("timestep",)


def import_cuda_torch() -> Any:
    """torch with a usable CUDA device, or a one-line MissingDependencyError saying what is missing."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(f"the torch-cuda backend needs torch: {TORCH_CUDA_HINT}") from None
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise MissingDependencyError(
            f"the torch-cuda backend needs a CUDA GPU: torch {torch.__version__} ({build}) sees none; "
            f"{TORCH_CUDA_HINT}"
        )
    return torch


@dataclass(frozen=True)
class TorchCudaOptions:
    """device: ``cuda`` or ``cuda:N``; cuda_graph: capture and replay the UNet (auto: on);
    precision: the text encoder's and UNet's; vae_precision: fp32, bf16, or fp16 guarded by an fp32
    rerun on overflow; warmup: plain launches before the capture (at least 1); timing: record each
    run's device time (CUDA events); compile: torch.compile the UNet (``unet`` and ``unet_cfg``) in
    ``compile_mode``, one of ``engine.backends.torch_cpu.COMPILE_MODES`` (ValueError otherwise)."""

    device: Device = CUDA
    cuda_graph: Switch = Switch.AUTO
    precision: Precision = Precision.FP16
    vae_precision: Precision = Precision.FP32
    warmup: int = 2
    timing: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self) -> None:
        check_compile_options(self.compile, self.compile_mode)


def cast_boundary(module: Any, dtype: Any, keep_float32: tuple[int, ...] = ()) -> Any:
    """module converted to dtype, taking and returning float32 (positions in keep_float32 stay float32)."""
    import torch

    class CastBoundary(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner.to(dtype)

        def forward(self, *args: torch.Tensor) -> Any:
            cast = [
                a.to(dtype) if a.is_floating_point() and i not in keep_float32 else a
                for i, a in enumerate(args)
            ]
            out = self.inner(*cast)
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    return CastBoundary(module).eval()


@dataclass
class TorchBuffers:
    """Static device inputs, their pinned host staging, the outputs of the last run and pinned copies."""

    inputs: dict[str, Any]
    staging: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    host_out: dict[str, Any] = field(default_factory=dict)


class TorchCudaOps:
    """GraphOps on torch: all device work on one private stream; graphs are torch.cuda.CUDAGraph.

    compile_mode: run ``module`` through ``torch.compile`` in that mode (None: eager). The first launch
    compiles (the runner's warm-up: nothing compiles inside a capture); ``compile_s`` is its wall time,
    synchronised.
    """

    def __init__(
        self,
        module: Any,
        spec: GraphSpec,
        device: Device,
        timing: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        import torch

        self.torch = torch
        self.module = module  # the eager module (its weights)
        self.compiled = None if compile_mode is None else compile_module(module, compile_mode)
        self._first_call = FirstCallClock()
        self.spec = spec
        self.device = torch.device(str(device))
        self.stream = torch.cuda.Stream(device=self.device)  # capture needs a non-default stream
        torch.cuda.synchronize(self.device)  # weights were copied on the default stream
        self.timing = timing
        self.device_ms: list[float] = []
        self._events: tuple[Any, Any] | None = None

    def allocate(
        self, shapes: Mapping[str, tuple[int, ...]], constants: frozenset[str] = frozenset()
    ) -> TorchBuffers:
        torch = self.torch
        dtypes = {t.name: getattr(torch, t.dtype) for t in self.spec.inputs}
        with torch.cuda.stream(self.stream):  # the allocator then ties these buffers to our stream
            inputs = {n: torch.empty(s, dtype=dtypes[n], device=self.device) for n, s in shapes.items()}
        staging = {n: torch.empty(s, dtype=dtypes[n], pin_memory=True) for n, s in shapes.items()}
        return TorchBuffers(inputs, staging)

    def release(self, buffers: TorchBuffers) -> None:
        self.stream.synchronize()
        for group in (buffers.inputs, buffers.staging, buffers.outputs, buffers.host_out):
            group.clear()

    def write_inputs(self, buffers: TorchBuffers, feeds: Mapping[str, np.ndarray]) -> None:
        """Through the pinned staging to the device buffers, on the stream (before the next launch)."""
        with self.torch.cuda.stream(self.stream):
            for name, value in feeds.items():
                np.copyto(buffers.staging[name].numpy(), value, casting="no")
                buffers.inputs[name].copy_(buffers.staging[name], non_blocking=True)

    def write_constants(self, buffers: TorchBuffers, constants: Mapping[str, np.ndarray]) -> None:
        """The same copy: no recorded graph holds input copies here."""
        self.write_inputs(buffers, constants)

    @property
    def compile_s(self) -> float | None:
        """Wall seconds of the first compiled launch (compilation, autotuning, one run); None if eager
        or not launched yet."""
        return self._first_call.seconds if self.compiled is not None else None

    def _forward(self, buffers: TorchBuffers) -> dict[str, Any]:
        args = [buffers.inputs[name] for name in self.spec.input_names]
        if self.compiled is None:
            out = self.module(*args)
        else:  # the first call compiles, timed up to the end of its device work
            out = self._first_call.call(self.compiled, *args, sync=self.stream.synchronize)
        outputs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, outputs, strict=True))

    def _start_timing(self) -> None:
        if self.timing:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(self.stream)
            self._events = (start, end)

    def launch(self, buffers: TorchBuffers) -> None:
        with self.torch.no_grad(), self.torch.cuda.stream(self.stream):
            self._start_timing()
            buffers.outputs = self._forward(buffers)

    def capture(self, buffers: TorchBuffers) -> Any:
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.no_grad(), self.torch.cuda.graph(graph, stream=self.stream):
            buffers.outputs = self._forward(buffers)  # static outputs: replays overwrite these tensors
        return graph

    def replay(self, graph: Any) -> None:
        with self.torch.cuda.stream(self.stream):
            self._start_timing()
            graph.replay()

    def release_graph(self, graph: Any) -> None:
        self.stream.synchronize()
        graph.reset()

    def read_outputs(self, buffers: TorchBuffers) -> dict[str, np.ndarray]:
        with self.torch.cuda.stream(self.stream):
            if self._events is not None:
                self._events[1].record(self.stream)
            for name, value in buffers.outputs.items():
                host = buffers.host_out.get(name)
                if host is None or host.shape != value.shape or host.dtype != value.dtype:
                    host = buffers.host_out[name] = self.torch.empty_like(
                        value, device="cpu", pin_memory=True
                    )
                host.copy_(value, non_blocking=True)
        self.stream.synchronize()
        if self._events is not None:
            self.device_ms.append(self._events[0].elapsed_time(self._events[1]))
            self._events = None
        return {name: buffers.host_out[name].numpy() for name in self.spec.output_names}


class TorchCudaGraph:
    """One network on the GPU behind the Graph interface; constants bound once per generation."""

    def __init__(
        self,
        spec: GraphSpec,
        module: Any,
        options: TorchCudaOptions,
        precision: Precision,
        capture: bool,
        compiled: bool = False,
    ) -> None:
        self.spec = spec
        self.capture = capture
        self.label = f"torch:{options.device}:{precision.value}" + (":compiled" if compiled else "")
        mode = options.compile_mode if compiled else None
        self.ops = TorchCudaOps(module, spec, options.device, options.timing, mode)
        self.runner = CudaGraphRunner(self.ops, options.warmup, enabled=capture)

    @property
    def providers(self) -> list[str]:
        """``torch:cuda:N:PRECISION``, then ``:compiled`` when torch.compile runs the module, then
        ``:cuda-graph`` only while the graph is captured (or will be) and no capture failed."""
        return graph_providers(self.label, [self.runner], self.capture)

    @property
    def compile_s(self) -> float | None:
        """Wall seconds of the first compiled launch (see :class:`TorchCudaOps`); None if eager or not
        run yet."""
        return self.ops.compile_s

    def bind_constants(self, constants: Mapping[str, np.ndarray]) -> None:
        self.runner.bind_constants(constants)

    def unbind_constants(self) -> None:
        self.runner.unbind_constants()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check feeds (with the bound constants) against the spec, run (or replay), return float32
        arrays the caller owns."""
        constants = self.runner.constants
        check_inputs(self.spec, {**constants, **feeds})
        varying = {name: feeds[name] for name in self.spec.input_names if name not in constants}
        outputs = self.runner.run(varying)
        return {name: np.array(outputs[name], copy=True) for name in self.spec.output_names}

    @property
    def device_ms(self) -> list[float]:
        """Device time of every timed run (TorchCudaOptions.timing)."""
        return self.ops.device_ms

    def reset(self) -> None:
        """Free the captured graph and static buffers (they come back on the next run)."""
        self.runner.reset()


TORCH_DTYPES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}


def network_module(source: Any, spec: GraphSpec, device: Device, precision: Precision) -> Any:
    """A network's wrapper module on the device, in ``precision`` behind a float32 boundary."""
    import copy

    import torch

    wrapper = source.wrapper(spec.network)
    if precision is Precision.FP32:
        return wrapper.to(str(device))
    if spec.network in (Network.VAE_DECODER, Network.VAE_ENCODER):
        wrapper = copy.deepcopy(wrapper)  # an fp32 VAE may share these weights and stays fp32
    keep = tuple(i for i, name in enumerate(spec.input_names) if name in FLOAT32_INPUTS)
    return cast_boundary(wrapper, getattr(torch, TORCH_DTYPES[precision]), keep).to(str(device))


def open_engine(engine_dir: Path, manifest: Manifest, options: Mapping[str, Any]) -> TorchCudaEngine:
    """A loader of the manifest's source networks on the GPU (options: see :class:`TorchCudaOptions`)."""
    opts = parse_backend_options(TorchCudaOptions, options, "torch-cuda")
    import_cuda_torch()
    from engine.models.torch_modules import load_source_from_manifest

    return TorchCudaEngine(manifest, load_source_from_manifest(manifest), opts)


class TorchCudaEngine:
    """Loads the source networks on the GPU; patchable in place (see
    :class:`engine.backends.weights.Patchable`): LoRA weights are copied into the modules' own storage,
    and the graphs of a patched network drop their captured CUDA graphs (captured again next run)."""

    in_place = True

    def __init__(self, manifest: Manifest, source: Any, options: TorchCudaOptions) -> None:
        self.manifest, self.source, self.options = manifest, source, options
        self.capture = Switch.of(options.cuda_graph).resolve(True)
        self._unet: Any = None  # the unet and unet_cfg graphs share one module (and its weights)
        self._modules: dict[Network, Any] = {}
        self._graphs: dict[Network, list[TorchCudaGraph]] = {}
        self.weights = InPlaceWeights(self._lora_modules)

    def _unet_module(self) -> Any:
        if self._unet is None:
            spec = self.manifest.graphs[Network.UNET].spec
            self._unet = network_module(self.source, spec, self.options.device, self.options.precision)
        return self._unet

    def _vae(self, spec: GraphSpec) -> Graph:
        opts = self.options
        fp32 = TorchCudaGraph(
            spec, network_module(self.source, spec, opts.device, Precision.FP32), opts, Precision.FP32, False
        )
        if opts.vae_precision is Precision.FP32:
            return fp32
        low = network_module(self.source, spec, opts.device, opts.vae_precision)
        graph = TorchCudaGraph(spec, low, opts, opts.vae_precision, False)
        return GuardedGraph(graph, fp32) if opts.vae_precision is Precision.FP16 else graph

    def __call__(self, network: Network) -> Graph:
        if network not in self.manifest.graphs:
            raise EngineFolderError(f"the engine folder has no {network.value} graph")
        spec, opts = self.manifest.graphs[network].spec, self.options
        if network in (Network.VAE_DECODER, Network.VAE_ENCODER):
            return self._vae(spec)
        if network is Network.UNET:
            graph = TorchCudaGraph(
                spec, self._unet_module(), opts, opts.precision, self.capture, opts.compile
            )
        elif network is Network.UNET_CFG:
            from engine.models.torch_modules import GuidedUNet

            guided = GuidedUNet(self._unet_module()).eval()
            graph = TorchCudaGraph(spec, guided, opts, opts.precision, self.capture, opts.compile)
        else:
            module = self._modules.setdefault(
                network, network_module(self.source, spec, opts.device, opts.precision)
            )
            graph = TorchCudaGraph(spec, module, opts, opts.precision, False)
        self._graphs.setdefault(network, []).append(graph)
        return graph

    def _lora_modules(self, network: Network) -> dict[str, Any]:
        from engine.models.torch_modules import lora_modules

        if network in (Network.UNET, Network.UNET_CFG):
            return lora_modules(self._unet_module())
        if network not in self._modules:
            self(network)
        return lora_modules(self._modules[network])

    def lora_targets(self, network: Network) -> dict[str, tuple[int, ...]]:
        return self.weights.targets(network)

    def load_patched(
        self, network: Network, targets: Collection[str], merge: Merge, identity: str | None = None
    ) -> Graph:
        self.weights.apply(network, targets, merge)
        for graph in self._graphs.get(network, []):
            graph.reset()  # the captured graph would replay the same kernels; recapture to be safe
        graphs = self._graphs.get(network)
        return graphs[-1] if graphs else self(network)
