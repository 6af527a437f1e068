"""What each contender runs inside its own process, and how its stages are timed.

sd-engine reports its stages itself (``GenerationResult.timings``). diffusers is timed by wrapping
the pipeline's *instances* (``text_encoder.forward``, SDXL's ``text_encoder_2.forward`` too,
``unet.forward``, ``vae.decode``, the scheduler's ``step`` and ``scale_model_input``) with clocks;
library modules are never patched. Every run starts from an empty prompt-embedding cache, so both sides
pay for the text encoders (the ``text_encoder`` stage: both of SDXL's together).

diffusers runs the pipeline class of the model folder's family: StableDiffusionPipeline for SD 1.x /
2.x, StableDiffusionXLPipeline for SDXL (without its invisible watermark, which sd-engine does not add
and which would lower the PSNR column). An empty negative prompt goes to diffusers as None, so an SDXL
model with ``force_zeros_for_empty_prompt`` conditions on zeros, as sd-engine does (SD 1.x / 2.x encode
"" either way).

This module is imported only by the child process; torch and diffusers are imported inside the
diffusers runner's methods.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.bench.config import ChildSpec, Contender, Device, Workload
from engine.bench.machine import package_versions
from engine.logs import quiet_libraries

StepHook = Callable[[int, int], None]  # (step, total) after each UNet evaluation


class Runner(Protocol):
    """One contender: import its libraries, load the model, generate one run's images."""

    def import_libraries(self) -> None: ...

    def load(self) -> None: ...

    def generate(self, prompt: str, on_step: StepHook) -> tuple[np.ndarray, dict[str, float]]:
        """The first image (HxWx3 uint8) and the stage timings in ms (``stats.STAGES`` inputs)."""
        ...

    def info(self) -> dict[str, Any]: ...

    def peak_gpu_mib(self) -> float | None: ...


def make_runner(spec: ChildSpec) -> Runner:
    if not spec.contender.is_engine:
        return DiffusersRunner(spec)
    return EngineRunner(spec)


# Backends whose graphs record each run's device time (CUDA events) when asked to.
TIMED_BACKENDS = ("torch-cuda", "tensorrt")


def backend_options(contender: Contender, device: Device) -> dict[str, Any]:
    """The options ``Pipeline.load`` passes to the contender's backend."""
    options: dict[str, Any] = {}
    if contender.cuda_graph is not None:
        options["cuda_graph"] = contender.cuda_graph
    if contender.compile:
        options["compile"] = True
    if contender.kind in TIMED_BACKENDS:
        options["timing"] = True
    if contender.kind == "onnxruntime":  # left to itself it would pick CUDA whenever it can
        options["device"] = device.value
    return options


def build_request(workload: Workload, prompt: str) -> Any:
    """The generation of one run as a GenerationRequest (the value the CLI builds too)."""
    from engine.pipeline.request import GenerationRequest

    w = workload
    settings = {
        "steps": w.steps,
        "guidance_scale": w.guidance_scale,
        "width": w.width,
        "height": w.height,
        "sampler": w.sampler,
        "seed": w.seed,
        "batch_size": w.batch_size,
    }
    return GenerationRequest.create(prompt, w.negative_prompt, **settings)


class EngineRunner:
    """sd-engine on one backend (the contender's kind), with the contender's options."""

    def __init__(self, spec: ChildSpec) -> None:
        if spec.engine_dir is None:
            raise ValueError(f"contender {spec.contender.name} needs an engine folder")
        self.spec = spec
        self.engine_dir: Path = spec.engine_dir
        self.pipe: Any = None
        self.ort_cache_present = False
        self.used: dict[str, None] = {}  # graphs the generations ran, in order of first use

    def import_libraries(self) -> None:
        importlib.import_module("engine.pipeline")
        if self.spec.contender.kind in ("torch", "torch-cuda"):
            importlib.import_module("torch")
            quiet_libraries()

    def load(self) -> None:
        from engine.pipeline import Pipeline

        cache = self.engine_dir / ".cache" / "onnxruntime"
        self.ort_cache_present = cache.is_dir() and any(cache.iterdir())
        contender = self.spec.contender
        self.pipe = Pipeline.load(
            self.engine_dir,
            backend=contender.kind,
            fused_cfg=contender.fused_cfg,
            **backend_options(contender, self.spec.device),
        )

    def unet_network(self, request: Any) -> Any:
        from engine.specs import Network

        return Network.UNET_CFG if self.pipe.uses_fused_cfg(request) else Network.UNET

    def generate(self, prompt: str, on_step: StepHook) -> tuple[np.ndarray, dict[str, float]]:
        from engine.specs import Network
        from engine.text.conditioning import EmbeddingCache

        request = build_request(self.spec.workload, prompt)
        unet_network = self.unet_network(request)
        for network in (*self.pipe.text_networks, unet_network, Network.VAE_DECODER):
            self.used[network.value] = None
        unet = self.pipe.graph(unet_network)  # loaded with the pipeline: the run uses it anyway
        clock = getattr(unet, "device_ms", None)
        done = len(clock) if clock is not None else 0
        calls = [0]

        def callback(info: Any) -> None:
            calls[0] += 1
            on_step(info.step, info.total)

        self.pipe.embeddings = EmbeddingCache()  # every run pays for its text encoder, as in diffusers
        result = self.pipe.run(request, on_step=callback)
        stages = {name: float(value) for name, value in result.timings.items()}
        stages["unet_calls"] = float(calls[0])
        if clock is not None:
            stages.update(device_stages(list(unet.device_ms)[done:]))
        return np.asarray(result.images[0]), stages

    def info(self) -> dict[str, Any]:
        """What the run used; reads only graphs the generations loaded (loading more would show in
        the peak RSS read after this). ``compile_s``: where the backend compiled the UNet
        (torch.compile), the wall seconds of its first, compiling call (that call's run included)."""
        from engine.machine import physical_cores
        from engine.specs import Network

        graphs = list(self.used)
        unet = next(Network(g) for g in graphs if g in (Network.UNET.value, Network.UNET_CFG.value))
        unet_graph = self.pipe.graph(unet)
        info: dict[str, Any] = {
            "backend": self.spec.contender.kind,
            "contender": self.spec.contender.name,
            "graphs": graphs,
            "fused_cfg": unet is Network.UNET_CFG,
            "providers": list(unet_graph.providers),
            "versions": package_versions(("onnxruntime", "numpy", "tokenizers", "pillow")),
        }
        compile_s = getattr(unet_graph, "compile_s", None)
        if compile_s is not None:
            info["compile_s"] = float(compile_s)
        if self.spec.contender.kind == "onnxruntime":
            info["intra_op_threads"] = physical_cores()
            info["optimized_graph_cache_present"] = self.ort_cache_present
        if self.spec.contender.kind in ("torch", "torch-cuda"):
            info.update(torch_info())
            if self.spec.contender.compile:
                info["versions"].update(package_versions(("torch", "triton")))
        return info

    def peak_gpu_mib(self) -> float | None:
        return torch_peak_gpu_mib() if self.spec.contender.kind in ("torch", "torch-cuda") else None


def device_stages(device_ms: list[float]) -> dict[str, float]:
    """The UNet's device time per step (CUDA events) of one run; its first step is left out when
    there are others (it can include a CUDA-graph capture or lazy allocation)."""
    if not device_ms:
        return {}
    steady = device_ms[1:] or device_ms
    return {"unet_device_per_step": float(np.mean(steady))}


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def torch_peak_gpu_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


class StageClock:
    """Accumulating host timers around methods of given *instances* (their own attributes are
    replaced): the CPU's clock, where every call has finished when it returns."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def wrap(self, obj: Any, method: str, name: str) -> None:
        inner = getattr(obj, method)
        self.totals[name] = 0.0
        self.calls[name] = 0

        @functools.wraps(inner)  # keeps the signature: diffusers inspects scheduler.step's parameters
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[name] += (time.perf_counter() - start) * 1000
                self.calls[name] += 1

        setattr(obj, method, timed)

    def finish(self) -> None:
        """Nothing to wait for: the totals are up to date."""


class EventClock:
    """CUDA events around methods of given *instances*: each stage's device time, with no
    synchronisation inside the loop, so the baseline's kernel launches overlap its GPU work as they do
    for its users (a clock that synchronised around every call would serialise them and flatter every
    contender against it). :meth:`finish` waits once, after the run, and fills ``totals`` (ms) and
    ``calls``."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.events: dict[str, list[tuple[Any, Any]]] = {}
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.events = {name: [] for name in self.events}

    def wrap(self, obj: Any, method: str, name: str) -> None:
        inner = getattr(obj, method)
        self.events[name] = []

        @functools.wraps(inner)  # keeps the signature: diffusers inspects scheduler.step's parameters
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            try:
                return inner(*args, **kwargs)
            finally:
                end.record()
                self.events[name].append((start, end))

        setattr(obj, method, timed)

    def per_call_ms(self, name: str) -> list[float]:
        """Device milliseconds of each call of one stage in the last run (after :meth:`finish`)."""
        return [start.elapsed_time(end) for start, end in self.events[name]]

    def finish(self) -> None:
        self.torch.cuda.synchronize()
        self.totals = {name: float(sum(self.per_call_ms(name))) for name in self.events}
        self.calls = {name: len(pairs) for name, pairs in self.events.items()}


def diffusers_pipeline(model_dir: Path, dtype: Any) -> Any:
    """The model folder in diffusers' text-to-image pipeline of its family (see the module notes), with
    weights in ``dtype``; no safety checker (SD 1.x / 2.x), no watermark (SDXL)."""
    import diffusers

    from engine.bench.models import is_xl_folder

    if is_xl_folder(model_dir):
        return diffusers.StableDiffusionXLPipeline.from_pretrained(
            model_dir, add_watermarker=False, torch_dtype=dtype
        )
    return diffusers.StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
    )


def timed_methods(pipe: Any) -> list[tuple[Any, str, str]]:
    """(instance, method, stage) the diffusers contender's clock wraps: SDXL's second text encoder
    when the pipeline has one."""
    encoders = [(pipe.text_encoder, "forward", "text_encoder")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.text_encoder_2, "forward", "text_encoder_2"))
    return [
        *encoders,
        (pipe.unet, "forward", "unet"),
        (pipe.vae, "decode", "vae_decode"),
        (pipe.scheduler, "step", "scheduler"),
        (pipe.scheduler, "scale_model_input", "scale_model_input"),
    ]


class DiffusersRunner:
    """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) in torch eager mode, fp32
    (fp16 on request): the baseline users know. On the CPU its stages are timed on the host; on CUDA with
    events (:class:`EventClock`), and fp32 there means fp32: TF32 off for matrix products and
    convolutions (the PSNR reference)."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.pipe: Any = None
        self.clock: StageClock | EventClock = StageClock()

    def import_libraries(self) -> None:
        for name in ("torch", "diffusers", "transformers"):
            importlib.import_module(name)
        quiet_libraries()

    def load(self) -> None:
        import diffusers
        import torch

        from engine.sampling.registry import lookup

        pipe = diffusers_pipeline(
            self.spec.model_dir, torch.float16 if self.spec.contender.fp16 else torch.float32
        )
        entry = lookup(self.spec.workload.sampler)
        scheduler_class = getattr(diffusers, str(entry.diffusers_class))
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **dict(entry.forced))
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(self.spec.device.value)
        if self.spec.device is Device.CUDA:
            self.clock = EventClock()
            if not self.spec.contender.fp16:  # this process runs one contender: global flags are its own
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
        for obj, method, name in timed_methods(pipe):
            self.clock.wrap(obj, method, name)
        self.pipe = pipe

    def generate(self, prompt: str, on_step: StepHook) -> tuple[np.ndarray, dict[str, float]]:
        import torch

        w = self.spec.workload
        generators = [torch.Generator("cpu").manual_seed(w.seed + i) for i in range(w.batch_size)]

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(i + 1, w.steps)
            return {}

        self.clock.reset()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(
                prompt,
                negative_prompt=w.negative_prompt or None,  # SDXL: zeros (see the module notes)
                num_inference_steps=w.steps,
                width=w.width,
                height=w.height,
                guidance_scale=w.guidance_scale,
                num_images_per_prompt=w.batch_size,
                generator=generators,
                output_type="pil",
                callback_on_step_end=callback,
            )
        total = (time.perf_counter() - start) * 1000  # the PIL image is on the host: the run is over
        self.clock.finish()
        stages = self.stages(total)
        if isinstance(self.clock, EventClock):
            stages.update(device_stages(self.clock.per_call_ms("unet")))
        return np.asarray(out.images[0]), stages

    def stages(self, total_ms: float) -> dict[str, float]:
        t, calls = self.clock.totals, max(self.clock.calls["unet"], 1)
        return {
            "text_encoder": t["text_encoder"] + t.get("text_encoder_2", 0.0),
            "unet_total": t["unet"],
            "unet_per_step": t["unet"] / calls,
            "scheduler_per_step": (t["scheduler"] + t["scale_model_input"]) / calls,
            "vae_decode": t["vae_decode"],
            "total": total_ms,
            "unet_calls": float(self.clock.calls["unet"]),
        }

    def info(self) -> dict[str, Any]:
        versions = package_versions(("torch", "diffusers", "transformers", "accelerate", "numpy", "pillow"))
        dtype = "float16" if self.spec.contender.fp16 else "float32"
        pipeline = type(self.pipe).__name__
        info = {"device": self.spec.device.value, "dtype": dtype, "pipeline": pipeline, "versions": versions}
        return {**info, **torch_info()}

    def peak_gpu_mib(self) -> float | None:
        return torch_peak_gpu_mib() if self.spec.device is Device.CUDA else None
