"""What a benchmark runs: contenders, the workload they share, and its validation.

Every check happens here, before any model is built or process spawned, and fails with one line
(``ValueError``) that names the bad value.

A contender is written ``NAME[:OPTION+OPTION...]``: ``diffusers`` or an sd-engine backend name
(``engine.pipeline.BackendName``, declared once), with options from one vocabulary: ``eager`` /
``graph`` (CUDA graphs off / on), ``fused`` / ``unfused`` (classifier-free guidance inside the
``unet_cfg`` graph / on the host), ``compile`` (``torch.compile`` of the UNet, the backends whose
registry entry ``compiles``) and ``fp16`` / ``fp32`` (diffusers' precision). For example
``torch-cuda:graph+fused+compile``, ``onnxruntime:unfused``, ``tensorrt:eager+unfused``, ``diffusers:fp16``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from engine import sizes

MAX_SIDE = 4096
SIZE_MULTIPLE = 8
DIFFUSERS = "diffusers"
ONNX_BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # what an engine folder's ONNX graphs feed
REFERENCE_BASELINE = "baseline"  # PSNR against the first contender's first image
REFERENCE_CPU_FP32 = "cpu-fp32"  # PSNR against diffusers fp32 on the CPU (one extra run)
REFERENCE_CUDA_FP32 = "cuda-fp32"  # PSNR against diffusers fp32 on the CUDA GPU (one extra run)
PSNR_REFERENCES = (REFERENCE_BASELINE, REFERENCE_CPU_FP32, REFERENCE_CUDA_FP32)


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


class Option(str, Enum):
    """Contender options, one vocabulary for every contender (each maps to a setting below)."""

    EAGER = "eager"
    GRAPH = "graph"
    FUSED = "fused"
    UNFUSED = "unfused"
    COMPILE = "compile"
    FP16 = "fp16"
    FP32 = "fp32"


# option -> (Contender field, value)
_OPTION_FIELDS = {
    Option.EAGER: ("cuda_graph", False),
    Option.GRAPH: ("cuda_graph", True),
    Option.FUSED: ("fused_cfg", True),
    Option.UNFUSED: ("fused_cfg", False),
    Option.COMPILE: ("compile", True),
    Option.FP16: ("fp16", True),
    Option.FP32: ("fp16", False),
}
_NEEDS = {
    DIFFUSERS: ("torch", "diffusers", "transformers"),
    "onnxruntime": ("onnxruntime",),
    "torch": ("torch", "diffusers", "transformers"),
    "torch-cuda": ("torch", "diffusers", "transformers"),
    "tensorrt": ("tensorrt",),
    "openvino": ("openvino",),
}
_LABELS = {
    DIFFUSERS: "diffusers (torch eager)",
    "onnxruntime": "sd-engine (ONNX Runtime)",
    "torch": "sd-engine (torch)",
    "torch-cuda": "sd-engine (torch-cuda)",
    "tensorrt": "sd-engine (TensorRT)",
    "openvino": "sd-engine (OpenVINO bf16)",
}


def backend_names() -> tuple[str, ...]:
    """sd-engine's backend names, read from their one declaration (the runtime's registry)."""
    from engine.runtime import backend_names as names

    return tuple(names())


def _backend(kind: str) -> Any:
    from engine.runtime import BackendName

    return BackendName(kind)


@dataclass(frozen=True)
class Contender:
    """Who runs the work: diffusers or sd-engine on one backend, with its options.

    cuda_graph / fused_cfg: None leaves the backend's default (fused guidance whenever the engine
    folder has the ``unet_cfg`` graph). compile: True runs the UNet through ``torch.compile`` (None:
    the backend's default, eager). fp16: diffusers in half precision (CUDA only).
    """

    kind: str  # "diffusers" or a backend name
    cuda_graph: bool | None = None
    fused_cfg: bool | None = None
    compile: bool | None = None
    fp16: bool = False

    @property
    def name(self) -> str:
        """The contender as written on the command line, options in a fixed order; the report's key."""
        options = [
            {True: Option.GRAPH, False: Option.EAGER}.get(self.cuda_graph),  # type: ignore[arg-type]
            {True: Option.FUSED, False: Option.UNFUSED}.get(self.fused_cfg),  # type: ignore[arg-type]
            Option.COMPILE if self.compile else None,
            Option.FP16 if self.fp16 else None,
        ]
        words = [o.value for o in options if o is not None]
        return self.kind + (":" + "+".join(words) if words else "")

    @property
    def label(self) -> str:
        """The report's column title, e.g. ``sd-engine (torch-cuda) graph + fused + torch.compile``."""
        base = _LABELS.get(self.kind, f"sd-engine ({self.kind})")
        if self.kind == DIFFUSERS and self.fp16:
            base = "diffusers (torch eager fp16)"
        words = [w for w in self.name.partition(":")[2].split("+") if w and w != Option.FP16.value]
        shown = ["torch.compile" if w == Option.COMPILE.value else w for w in words]
        return f"{base} {' + '.join(shown)}" if shown else base

    @property
    def is_engine(self) -> bool:
        return self.kind != DIFFUSERS

    @property
    def needs(self) -> tuple[str, ...]:
        """Python packages the contender's process imports."""
        return _NEEDS.get(self.kind, ())

    def runs_on(self, device: Device) -> bool:
        """diffusers runs anywhere; a backend where the registry says it can."""
        if self.kind == DIFFUSERS:
            return True
        backend = _backend(self.kind)
        return backend.runs_on_cuda if device is Device.CUDA else backend.runs_on_cpu

    @staticmethod
    def parse(text: str) -> Contender:
        """``"torch-cuda:graph+fused"`` -> Contender; ValueError naming the bad part."""
        kind, _, rest = text.strip().lower().partition(":")
        valid = (DIFFUSERS, *backend_names())
        if kind not in valid:
            raise ValueError(f"unknown contender {kind!r}; valid contenders: {', '.join(valid)}")
        settings: dict[str, bool] = {}
        for word in (w.strip() for w in rest.split("+")) if rest else ():
            try:
                field, value = _OPTION_FIELDS[Option(word)]
            except ValueError:
                raise ValueError(
                    f"unknown option {word!r} in contender {text.strip()!r}; valid options: {_valid(Option)}"
                ) from None
            if settings.get(field, value) != value:
                raise ValueError(f"contender {text.strip()!r} sets {field} both ways")
            settings[field] = value
        contender = Contender(kind, **settings)
        contender.check_options()
        return contender

    def check_options(self) -> None:
        """ValueError when an option does not apply to the contender's kind."""
        engine_options = (self.cuda_graph, self.fused_cfg, self.compile)
        if self.kind == DIFFUSERS and any(o is not None for o in engine_options):
            raise ValueError(f"contender {self.name!r}: diffusers takes only fp16 / fp32")
        if self.kind != DIFFUSERS and self.fp16:
            raise ValueError(f"contender {self.name!r}: fp16 / fp32 is a diffusers option")
        if self.cuda_graph is not None and not _backend(self.kind).has_cuda_graphs:
            graphs = ", ".join(n for n in backend_names() if _backend(n).has_cuda_graphs)
            raise ValueError(f"contender {self.name!r}: eager / graph is an option of {graphs}")
        if self.compile is not None and not _backend(self.kind).compiles:
            compilers = ", ".join(n for n in backend_names() if _backend(n).compiles)
            raise ValueError(f"contender {self.name!r}: compile (torch.compile) is an option of {compilers}")

    def device_problem(self, device: Device) -> str | None:
        """Why the contender cannot run on ``device`` (a phrase without its name), or None."""
        if not self.runs_on(device):
            where = "the CPU" if device is Device.CUDA else "a CUDA GPU"
            return f"runs on {where}, not --device {device.value}"
        if device is Device.CPU and self.cuda_graph:
            return "graph (CUDA graphs) needs --device cuda"
        if device is Device.CPU and self.fp16:
            return "fp16 needs --device cuda"
        return None

    def check_device(self, device: Device) -> None:
        """ValueError when the contender cannot run on ``device``."""
        if not self.runs_on(device):
            other = Device.CPU if device is Device.CUDA else Device.CUDA
            where = "the CPU" if other is Device.CPU else "a CUDA GPU"
            raise ValueError(
                f"contender {self.name!r} runs on {where}; "
                f"drop it from --contenders or use --device {other.value}"
            )
        problem = self.device_problem(device)
        if problem is not None:
            raise ValueError(f"contender {self.name!r}: {problem}")


@dataclass(frozen=True)
class Workload:
    """The work every contender does: one generation a run, the same in every process."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    width: int = 256
    height: int = 256
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "Euler a"
    batch_size: int = 1
    seed: int = 42

    def prompt_for(self, generation: int, warmup: int) -> int:
        """Index of the prompt of a generation: warm-ups use the first, timed run i uses i mod n."""
        return 0 if generation < warmup else (generation - warmup) % len(self.prompts)

    def key(self) -> dict[str, Any]:
        """The settings that decide the cost of a run (what two runs must share to be compared)."""
        data = asdict(self)
        return {k: data[k] for k in ("width", "height", "steps", "guidance_scale", "sampler", "batch_size")}


@dataclass(frozen=True)
class BenchConfig:
    """A validated benchmark: the first contender is the baseline the others are compared with."""

    model_dir: Path
    engine_dir: Path
    model_label: str
    contenders: tuple[Contender, ...]
    workload: Workload
    runs: int = 3
    warmup: int = 1
    device: Device = Device.CPU
    prompt_source: str = "built-in"
    prewarm_files: bool = True
    psnr_reference: str = REFERENCE_BASELINE
    skipped: tuple[tuple[str, str], ...] = ()  # (contender name, why it cannot run here)

    @property
    def baseline(self) -> Contender:
        return self.contenders[0]

    @property
    def generations(self) -> int:
        """Generations per contender; the first is the cold one, the last ``runs`` are timed."""
        return self.warmup + self.runs

    def to_json(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "engine_dir": str(self.engine_dir),
            "model": self.model_label,
            "contenders": [c.name for c in self.contenders],
            "baseline": self.baseline.name,
            "runs": self.runs,
            "warmup": self.warmup,
            "device": self.device.value,
            "prompt_source": self.prompt_source,
            "prewarm_files": self.prewarm_files,
            "psnr_reference": self.psnr_reference,
            "skipped": dict(self.skipped),
            "workload": {**asdict(self.workload), "prompts": list(self.workload.prompts)},
        }


def parse_contenders(text: str) -> tuple[Contender, ...]:
    """``"diffusers,onnxruntime,torch-cuda:graph+fused"`` -> contenders in order, without repeats."""
    parts = [n for n in text.split(",") if n.strip()]
    if not parts:
        raise ValueError("--contenders is empty; give at least one of: " + ", ".join(contender_kinds()))
    out: list[Contender] = []
    for part in parts:
        contender = Contender.parse(part)
        if contender not in out:
            out.append(contender)
    return tuple(out)


def contender_kinds() -> tuple[str, ...]:
    return (DIFFUSERS, *backend_names())


def parse_size(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"512x768"`` -> (512, 768); sides must be multiples of 8 px."""
    try:
        width, height = sizes.parse_size(text, square_ok=True)
    except ValueError:
        raise ValueError(f"--size must be N or WxH in pixels (e.g. 512 or 512x768), got {text!r}") from None
    for side in (width, height):
        if side % SIZE_MULTIPLE or not SIZE_MULTIPLE <= side <= MAX_SIDE:
            raise ValueError(
                f"--size sides must be multiples of {SIZE_MULTIPLE} px in {SIZE_MULTIPLE}..{MAX_SIDE}, "
                f"got {width}x{height}"
            )
    return width, height


def check_counts(runs: int, warmup: int, steps: int, batch_size: int) -> None:
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {warmup}")
    if not 1 <= steps <= 1000:
        raise ValueError(f"--steps must be in 1..1000, got {steps}")
    if not 1 <= batch_size <= 64:
        raise ValueError(f"--batch must be in 1..64, got {batch_size}")


def check_sampler(sampler: str, contenders: tuple[Contender, ...]) -> None:
    """The sampler must exist, and have a diffusers scheduler when diffusers takes part."""
    from engine.sampling.registry import lookup

    entry = lookup(sampler)  # ValueError listing the valid names
    if any(not c.is_engine for c in contenders) and entry.diffusers_class is None:
        raise ValueError(
            f"sampler {sampler!r} has no diffusers scheduler; "
            "pick another sampler or drop diffusers from --contenders"
        )


def check_device(
    contenders: tuple[Contender, ...], device: Device, skip: bool = False
) -> tuple[tuple[Contender, ...], tuple[tuple[str, str], ...]]:
    """The contenders that can run on the device, and the skipped ones with their reasons.

    Without ``skip`` the first contender that cannot run there is refused (ValueError); the baseline
    (the first) is never skipped. ``--device cuda`` needs a CUDA GPU whatever is skipped.
    """
    kept: list[Contender] = []
    skipped: list[tuple[str, str]] = []
    for index, contender in enumerate(contenders):
        problem = contender.device_problem(device)
        if problem is None:
            kept.append(contender)
        elif skip and index > 0:
            skipped.append((contender.name, problem))
        else:
            contender.check_device(device)
    if device is Device.CUDA:
        missing = cuda_missing()
        if missing:
            raise ValueError(f"--device cuda: {missing}; run the CPU contenders with --device cpu")
    return tuple(kept), tuple(skipped)


def check_psnr_reference(reference: str, device: Device) -> None:
    """The PSNR reference must be known; ``cuda-fp32`` runs on the GPU, so it needs ``--device cuda``."""
    if reference not in PSNR_REFERENCES:
        raise ValueError(f"--psnr-reference {reference!r} is not one of {', '.join(PSNR_REFERENCES)}")
    if reference == REFERENCE_CUDA_FP32 and device is not Device.CUDA:
        raise ValueError(
            f"--psnr-reference {REFERENCE_CUDA_FP32} runs diffusers fp32 on the GPU: it needs --device cuda "
            f"(on the CPU use {REFERENCE_CPU_FP32})"
        )


def cuda_missing() -> str | None:
    """Why no CUDA GPU can be used here, or None (asks torch when installed, else nvidia-smi)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"
    return None if shutil.which("nvidia-smi") else "no NVIDIA driver (nvidia-smi not found)"


def unavailable(contender: Contender, device: Device, engine_dir: Path | None) -> str | None:
    """Why a contender cannot run on this machine, or None: the device, packages, providers, TensorRT
    plans, bf16 arithmetic for openvino."""
    problem = contender.device_problem(device)
    if problem is not None:
        return problem
    missing = [m for m in contender.needs if importlib.util.find_spec(m) is None]
    if missing:
        hint = ' (pip install "sd-engine[export]")' if "torch" in missing else ""
        return f"needs {', '.join(missing)}, which is not installed{hint}"
    if contender.kind == "onnxruntime" and device is Device.CUDA:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return 'onnxruntime has no CUDA provider (pip install "sd-engine[gpu]")'
    compiler = compiler_missing(contender)
    if compiler is not None:
        return compiler
    if contender.kind in ONNX_BACKENDS and engine_dir is not None and torch_only(engine_dir):
        return f"engine folder {engine_dir} was exported with --torch-only (no ONNX graphs)"
    plans = None if engine_dir is None else engine_dir / "tensorrt" / "plans.json"
    if contender.kind == "tensorrt" and plans is not None and not plans.is_file():
        return f"no TensorRT plans in {engine_dir}: run `sd-engine build {engine_dir}` first"
    if contender.kind == "openvino":
        return openvino_bf16_missing()
    return None


def openvino_bf16_missing() -> str | None:
    """Why the openvino contender (bf16, the backend's default) cannot run on this CPU, or None: the
    backend refuses bf16 where the CPU has no bf16 arithmetic (asks OpenVINO, which must be installed)."""
    from engine.backends.openvino import check_precision, import_openvino
    from engine.errors import EngineError
    from engine.specs import Precision

    try:
        check_precision(import_openvino().Core(), Precision.BF16)
    except EngineError as error:
        return str(error).partition(";")[0]
    return None


def torch_only(engine_dir: Path) -> bool:
    """Whether the engine folder holds no ONNX graphs (``sd-engine export --torch-only``); False for a
    folder that cannot be read (the run then says why)."""
    from engine.errors import EngineFolderError
    from engine.manifest import read_manifest

    try:
        return read_manifest(engine_dir).torch_only
    except EngineFolderError:
        return False


def compiler_missing(contender: Contender) -> str | None:
    """Why ``torch.compile`` cannot build the contender's kernels on this machine, or None.

    TorchInductor builds C++ kernels on the CPU with ``$CXX`` or g++ (clang++ on macOS); on CUDA,
    Triton builds its kernel launchers with ``$CC``, gcc or clang. Both compile against Python's C
    headers (Python.h).
    """
    if not contender.compile:
        return None
    if contender.kind == "torch-cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed"
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "torch.compile on CUDA needs a C compiler for Triton (gcc or clang on PATH, or $CC)"
    else:
        cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            return f"torch.compile on the CPU needs a C++ compiler: {cxx} not found (set $CXX)"
    if not python_headers():
        where = sysconfig.get_paths()["include"]
        return f"torch.compile needs Python's C headers: no Python.h in {where} (the python3-dev package)"
    return None


def python_headers() -> bool:
    """Whether Python.h is where the compilers look: the default install scheme's include folder, or
    posix_prefix's, which Triton uses instead of Debian's posix_local."""
    schemes = {sysconfig.get_default_scheme(), "posix_prefix"} & set(sysconfig.get_scheme_names())
    folders = {sysconfig.get_paths(scheme=scheme)["include"] for scheme in schemes}
    return any(Path(folder, "Python.h").is_file() for folder in folders)


def check_available(
    contenders: tuple[Contender, ...], device: Device, engine_dir: Path | None, skip: bool
) -> tuple[tuple[Contender, ...], tuple[tuple[str, str], ...]]:
    """The contenders that can run here and the skipped ones with their reasons.

    Without ``skip`` the first contender that cannot run is refused (ValueError); the baseline is
    never skipped.
    """
    kept: list[Contender] = []
    skipped: list[tuple[str, str]] = []
    for index, contender in enumerate(contenders):
        reason = unavailable(contender, device, engine_dir)
        if reason is None:
            kept.append(contender)
        elif skip and index > 0:
            skipped.append((contender.name, reason))
        else:
            raise ValueError(f"contender {contender.name!r} cannot run here: {reason}")
    return tuple(kept), tuple(skipped)


def _valid(enum: type[Enum]) -> str:
    return ", ".join(str(e.value) for e in enum)


@dataclass(frozen=True)
class ChildSpec:
    """What one contender's process runs; it travels to the child as a JSON file."""

    contender: Contender
    model_dir: Path
    engine_dir: Path | None
    workload: Workload
    runs: int
    warmup: int
    device: Device
    out_dir: Path

    @property
    def generations(self) -> int:
        return self.warmup + self.runs

    def to_json(self) -> dict[str, Any]:
        return {
            "contender": self.contender.name,
            "model_dir": str(self.model_dir),
            "engine_dir": None if self.engine_dir is None else str(self.engine_dir),
            "workload": {**asdict(self.workload), "prompts": list(self.workload.prompts)},
            "runs": self.runs,
            "warmup": self.warmup,
            "device": self.device.value,
            "out_dir": str(self.out_dir),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ChildSpec:
        workload = dict(data["workload"])
        workload["prompts"] = tuple(workload["prompts"])
        return ChildSpec(
            contender=Contender.parse(data["contender"]),
            model_dir=Path(data["model_dir"]),
            engine_dir=None if data["engine_dir"] is None else Path(data["engine_dir"]),
            workload=Workload(**workload),
            runs=int(data["runs"]),
            warmup=int(data["warmup"]),
            device=Device(data["device"]),
            out_dir=Path(data["out_dir"]),
        )
