"""The plan cache: keys, sidecars and plans.json, read by the builder and by the tensorrt backend.

Pure file and JSON work: neither TensorRT nor polygraphy is imported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import BuildError, EngineFolderError
from engine.fsutil import write_atomic
from engine.hashing import json_digest, sha256_file
from engine.specs import (
    GraphSpec,
    ModelDims,
    Network,
    Precision,
)

if TYPE_CHECKING:
    from engine.tensorrt.builder import BuildSettings
from engine.tensorrt.profiles import ShapeProfile, profile_shapes

PLAN_DIR = "tensorrt"


INDEX_NAME = "plans.json"


KEY_VERSION = 1


class Rebuild(str, Enum):
    """When a plan is rebuilt: AUTO when its cached plan is missing or keyed differently; ALWAYS
    (``--force``); NEVER (``--no-rebuild``: a plan that would need building is an error)."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int = 0

    @property
    def description(self) -> str:
        return f"{self.name} (compute {self.compute_capability})"


@dataclass(frozen=True)
class PlanTarget:
    """One plan to build: a network at a precision; strongly typed when the ONNX is already fp16."""

    network: Network
    precision: Precision
    strongly_typed: bool = False

    @property
    def name(self) -> str:
        return f"{self.network.value}-{self.precision.value}"


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; a plan is used only when its sidecar holds this exact key."""

    network: str
    onnx_sha256: str
    precision: str
    strongly_typed: bool
    profiles: tuple[tuple[tuple[str, tuple[tuple[int, ...], ...]], ...], ...]
    refit: bool
    workspace_bytes: int
    optimization_level: int
    tensorrt: str
    gpu: str
    compute_capability: str
    key_version: int = KEY_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["profiles"] = [{name: [list(s) for s in shapes] for name, shapes in p} for p in self.profiles]
        return data

    def digest(self) -> str:
        return json_digest(self.to_json())


def plan_key(
    target: PlanTarget,
    spec: GraphSpec,
    onnx_sha256: str,
    profiles: Sequence[ShapeProfile],
    dims: ModelDims,
    settings: BuildSettings,
    tensorrt_version: str,
    gpu: GpuInfo,
) -> PlanKey:
    shapes = tuple(tuple(sorted(profile_shapes(spec, p, dims).items())) for p in profiles)
    return PlanKey(
        network=target.network.value,
        onnx_sha256=onnx_sha256,
        precision=target.precision.value,
        strongly_typed=target.strongly_typed,
        profiles=shapes,
        refit=settings.refit,
        workspace_bytes=settings.workspace_bytes,
        optimization_level=settings.optimization_level,
        tensorrt=tensorrt_version,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
    )


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def read_sidecar(plan: Path) -> dict[str, Any]:
    """The sidecar of a plan; BuildError saying what is wrong when it is missing or corrupt."""
    path = sidecar_path(plan)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BuildError(f"{path.name} is corrupt ({error})") from None
    fields = {"digest": str, "key": dict, "plan_bytes": int, "plan_sha256": str, "parity": dict}
    for field, kind in fields.items():
        if not isinstance(data, dict) or not isinstance(data.get(field), kind):
            raise BuildError(f"{path.name} is corrupt (bad or missing '{field}')")
    return data


def key_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Why a stored key differs from the wanted one, in words; None when they are equal."""
    if dict(old) == dict(new):
        return None
    env = ("tensorrt", "gpu", "compute_capability")
    if any(old.get(k) != new.get(k) for k in env):
        return (
            f"it was built with TensorRT {old.get('tensorrt')} on {old.get('gpu')} "
            f"(compute {old.get('compute_capability')}); this machine has TensorRT {new.get('tensorrt')} "
            f"on {new.get('gpu')} (compute {new.get('compute_capability')})"
        )
    words = {
        "onnx_sha256": "the ONNX graph changed",
        "precision": "the precision changed",
        "strongly_typed": "the ONNX precision changed",
        "profiles": "the shape profiles changed",
        "refit": "the refittable flag changed",
        "workspace_bytes": "the workspace size changed",
        "optimization_level": "the builder optimization level changed",
        "network": "it is another network's plan",
        "key_version": "it has an older key format",
    }
    changed = [words.get(k, f"{k} changed") for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed)


def plan_problem(plan: Path, key: PlanKey, verify_bytes: bool = True) -> str | None:
    """Why the cached plan cannot be used for key (None: it can). Never trusts file existence alone."""
    if not plan.is_file():
        return "there is no plan yet"
    try:
        sidecar = read_sidecar(plan)
    except BuildError as error:
        return str(error)
    mismatch = key_mismatch(sidecar["key"], key.to_json())
    if mismatch is not None or sidecar["digest"] != key.digest():
        return mismatch or "its sidecar digest does not match its key"
    if plan.stat().st_size != sidecar["plan_bytes"]:
        return "the plan file is truncated"
    if verify_bytes and sha256_file(plan) != sidecar["plan_sha256"]:
        return "the plan file is corrupt (sha256 differs from its sidecar)"
    if not sidecar["parity"].get("passed", False):
        return "it failed its parity gate"
    return None


def needs_build(plan: Path, key: PlanKey, rebuild: Rebuild = Rebuild.AUTO) -> str | None:
    """The reason to build this plan, or None to reuse it; Rebuild.NEVER turns a needed build into a
    BuildError naming the reason."""
    problem = "--force was given" if rebuild is Rebuild.ALWAYS else plan_problem(plan, key)
    if problem is not None and rebuild is Rebuild.NEVER:
        raise BuildError(
            f"TensorRT plan {plan} cannot be used: {problem}; --no-rebuild was given "
            "(run `sd-engine build` without it)"
        )
    return problem


def write_sidecar(plan: Path, key: PlanKey, plan_bytes: bytes, extra: Mapping[str, Any]) -> None:
    data = {
        "digest": key.digest(),
        "key": key.to_json(),
        "plan": plan.name,
        "plan_bytes": len(plan_bytes),
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        **extra,
    }
    write_atomic(sidecar_path(plan), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def plan_index(targets: Sequence[PlanTarget], passed: Mapping[str, bool]) -> dict[str, Any]:
    """plans.json: per network, the plan the runtime uses and its fp32 fallback (guarded VAE)."""
    networks: dict[str, dict[str, str | None]] = {}
    for network in dict.fromkeys(t.network for t in targets):
        ok = [t for t in targets if t.network is network and passed.get(t.name)]
        if not ok:
            continue
        fp16 = [t for t in ok if t.precision is Precision.FP16]
        fp32 = [t for t in ok if t.precision is Precision.FP32]
        primary = (fp16 or fp32)[0]
        fallback = fp32[0] if fp16 and fp32 else None
        networks[network.value] = {
            "plan": f"{primary.name}.plan",
            "fallback": f"{fallback.name}.plan" if fallback else None,
        }
    return {"format_version": 1, "networks": networks}


def merge_index(old: Mapping[str, Any], new: Mapping[str, Any], built: Sequence[Network]) -> dict[str, Any]:
    """plans.json after a build of some networks: theirs replaced (or dropped if failed), the rest kept."""
    networks = {k: v for k, v in old.items() if k not in {n.value for n in built}}
    networks.update(new["networks"])
    return {**new, "networks": dict(sorted(networks.items()))}


def read_plan_index(engine_dir: Path) -> dict[str, dict[str, str | None]]:
    path = engine_dir / PLAN_DIR / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        networks = data["networks"]
        if not isinstance(networks, dict):
            raise TypeError("networks is not an object")
    except FileNotFoundError:
        raise EngineFolderError(
            f"{engine_dir} has no TensorRT plans; build them with `sd-engine build {engine_dir}`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EngineFolderError(f"corrupt {path}: {error}; rebuild with `sd-engine build`") from None
    return networks


def default_timing_cache(plan_dir: Path, tensorrt_version: str, gpu: GpuInfo) -> Path:
    gpu_tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-").lower()
    return plan_dir / f"timing-trt{tensorrt_version}-{gpu_tag}-sm{gpu.compute_capability}.cache"
