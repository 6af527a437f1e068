"""What a benchmark runs: contenders, the workload they share, and its validation.

Every check happens here, before any model is built or process spawned, and fails with one line
(``ValueError``) that names the bad value.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

MAX_SIDE = 4096
SIZE_MULTIPLE = 8


class Contender(str, Enum):
    """Who runs the work: diffusers (torch eager) or sd-engine on one backend."""

    DIFFUSERS = "diffusers"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def is_engine(self) -> bool:
        return self is not Contender.DIFFUSERS

    @property
    def needs(self) -> tuple[str, ...]:
        """Python packages the contender's process imports."""
        return _NEEDS[self]


_LABELS = {
    Contender.DIFFUSERS: "diffusers (torch eager)",
    Contender.ONNXRUNTIME: "sd-engine (ONNX Runtime)",
    Contender.TORCH: "sd-engine (torch)",
    Contender.TENSORRT: "sd-engine (TensorRT)",
    Contender.OPENVINO: "sd-engine (OpenVINO bf16)",
}
_NEEDS = {
    Contender.DIFFUSERS: ("torch", "diffusers", "transformers"),
    Contender.ONNXRUNTIME: ("onnxruntime",),
    Contender.TORCH: ("torch", "diffusers", "transformers"),
    Contender.TENSORRT: ("tensorrt",),
    Contender.OPENVINO: ("openvino",),
}


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


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
            "contenders": [c.value for c in self.contenders],
            "baseline": self.baseline.value,
            "runs": self.runs,
            "warmup": self.warmup,
            "device": self.device.value,
            "prompt_source": self.prompt_source,
            "prewarm_files": self.prewarm_files,
            "workload": {**asdict(self.workload), "prompts": list(self.workload.prompts)},
        }


def parse_contenders(text: str) -> tuple[Contender, ...]:
    """``"diffusers,onnxruntime"`` -> contenders in order, without repeats."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--contenders is empty; give at least one of: " + _valid(Contender))
    out: list[Contender] = []
    for name in names:
        try:
            contender = Contender(name)
        except ValueError:
            raise ValueError(f"unknown contender {name!r}; valid contenders: {_valid(Contender)}") from None
        if contender not in out:
            out.append(contender)
    return tuple(out)


def parse_size(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"512x768"`` -> (512, 768); sides must be multiples of 8 px."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if match is None:
        raise ValueError(f"--size must be N or WxH in pixels (e.g. 512 or 512x768), got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2) or width)
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
    if Contender.DIFFUSERS in contenders and entry.diffusers_class is None:
        raise ValueError(
            f"sampler {sampler!r} has no diffusers scheduler; "
            "pick another sampler or drop diffusers from --contenders"
        )


def check_installed(contenders: tuple[Contender, ...]) -> None:
    """Each contender's packages must be importable (checked without importing them)."""
    for contender in contenders:
        missing = [m for m in contender.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(
                f"contender {contender.value!r} needs {', '.join(missing)}, which is not installed"
                + (' (pip install "sd-engine[export]")' if "torch" in missing else "")
            )


def check_device(contenders: tuple[Contender, ...], device: Device) -> None:
    """CPU-only contenders cannot take part in a GPU benchmark."""
    if device is Device.CUDA and Contender.OPENVINO in contenders:
        raise ValueError(
            "contender 'openvino' runs on the CPU; drop it from --contenders or use --device cpu"
        )


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
            "contender": self.contender.value,
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
            contender=Contender(data["contender"]),
            model_dir=Path(data["model_dir"]),
            engine_dir=None if data["engine_dir"] is None else Path(data["engine_dir"]),
            workload=Workload(**workload),
            runs=int(data["runs"]),
            warmup=int(data["warmup"]),
            device=Device(data["device"]),
            out_dir=Path(data["out_dir"]),
        )
