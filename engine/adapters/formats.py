"""Per-format weight deltas: LoRA / LoCon, LoHa, LoKr, full diffs, and DoRA's magnitude rescale.

Every format rebuilds a delta ``dW`` of one weight (torch layout: ``(out, in)`` Linear, ``(out, in, kh,
kw)`` Conv2d) from the factors a file stores; the model's weight becomes ``W + m * scale * dW`` at
multiplier ``m``. The formulas are LyCORIS's (``lycoris/functional/{locon,loha,lokr}.py``,
``diff_weight``), which A1111 and ComfyUI follow:

========  =========================================================================================
lora      ``up @ down`` (kohya ``lora_up``/``lora_down``, PEFT ``lora_B``/``lora_A``); conv kernels live
          in ``down`` (``(r, in, kh, kw)``), ``up`` is ``(out, r[, 1, 1])``; scale ``alpha / r``
locon     with ``lora_mid`` (Tucker core ``(r, r, kh, kw)``):
          ``dW[o, i, ...] = sum_ab up[o, a] mid[a, b, ...] down[b, i]``; scale ``alpha / r``
loha      ``(w1a @ w1b) * (w2a @ w2b)``, element-wise; with ``hada_t1``/``hada_t2`` each factor is the
          Tucker product ``sum_ab t[a, b, ...] wa[a, o] wb[b, i]``; scale ``alpha / r``, r = w1b's rows
lokr      ``kron(w1, w2)``, each factor given whole (``lokr_w1``) or as a product (``lokr_w1_a @
          lokr_w1_b``; ``lokr_w2`` may be a Tucker product with ``lokr_t2``); scale ``alpha / r`` only
          when a factor is a product (r its rank), else 1
full      ``diff`` is dW itself; scale 1
========  =========================================================================================

A missing or zero alpha means alpha = r (scale 1), as in kohya's and LyCORIS's loaders.

DoRA (``dora_scale``, PEFT's ``lora_magnitude_vector``) rescales the merged weight to a stored norm:
``W_dora = mag * (W + dW) / ||W + dW||``, the norm taken per output channel (``mag`` shaped ``(out,
1[, 1, 1])`` or 1-D) or per input channel (``(1, in[, 1, 1])``, what kohya and LyCORIS store by
default). At multiplier ``m`` the weight becomes ``W + m * (W_dora - W)`` (A1111's ``finalize_updown``
and LyCORIS's ``apply_dora_scale``); at ``m = 1`` this is LyCORIS's ``weight_decompose`` and PEFT's
merged DoRA weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import Enum

import numpy as np

from engine.adapters.files import AdapterError
from engine.adapters.keys import Target

# LyCORIS's weight_decompose adds float32's epsilon to the norm, so an all-zero row stays finite
_NORM_EPSILON = float(np.finfo(np.float32).eps)
Shapes = Mapping[str, tuple[int, ...]]  # role -> factor shape


class DeltaKind(str, Enum):
    LORA = "lora"
    LOCON = "locon"  # LoRA with a Tucker core (lora_mid)
    LOHA = "loha"
    LOKR = "lokr"
    FULL = "full"


_LORA_ROLES = frozenset({"down", "up", "mid"})
_REQUIRED = {
    DeltaKind.LORA: ("down", "up"),
    DeltaKind.LOCON: ("down", "up", "mid"),
    DeltaKind.LOHA: ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    DeltaKind.LOKR: (),
    DeltaKind.FULL: ("diff",),
}
# roles that only modify another module's delta
MODIFIER_ROLES = frozenset({"alpha", "dora_scale", "magnitude"})


def kind_of(roles: Set[str]) -> DeltaKind | None:
    """The format a module's roles form, or None when they form none (only an alpha, a lone half, a
    Tucker core without its factors). AdapterError when one module mixes two formats."""
    kinds = set()
    if roles & _LORA_ROLES:
        kinds.add(DeltaKind.LOCON if "mid" in roles else DeltaKind.LORA)
    if any(r.startswith("hada_") for r in roles):
        kinds.add(DeltaKind.LOHA)
    if any(r.startswith("lokr_") for r in roles):
        kinds.add(DeltaKind.LOKR)
    if "diff" in roles:
        kinds.add(DeltaKind.FULL)
    if len(kinds) > 1:
        raise AdapterError(f"one module mixes {' and '.join(sorted(k.value for k in kinds))} keys")
    kind = kinds.pop() if kinds else None
    if kind is None or not set(_REQUIRED[kind]) <= roles:
        return None
    if kind is DeltaKind.LOHA and ("hada_t1" in roles) != ("hada_t2" in roles):
        return None
    if kind is DeltaKind.LOKR and not _lokr_complete(roles):
        return None
    return kind


def _lokr_complete(roles: Set[str]) -> bool:
    return all(f"lokr_w{n}" in roles or {f"lokr_w{n}_a", f"lokr_w{n}_b"} <= roles for n in (1, 2)) and (
        "lokr_t2" not in roles or "lokr_w2" not in roles
    )


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _matrix(array: np.ndarray) -> np.ndarray:
    """A factor as a float32 matrix: its first axis by the rest."""
    return _f32(array).reshape(array.shape[0], -1)


def _mismatch(what: str, arrays: Mapping[str, np.ndarray], roles: tuple[str, ...]) -> AdapterError:
    shapes = ", ".join(f"{r} {tuple(arrays[r].shape)}" for r in roles)
    return AdapterError(f"{what}: factors do not chain ({shapes})")


def rank_of(kind: DeltaKind, arrays: Mapping[str, np.ndarray]) -> int | None:
    """The rank alpha is divided by: lora_down's rows, hada_w1_b's rows, a factorised LoKr half's
    rank; None where the format has no rank (a LoKr of whole factors, a full diff)."""
    if kind in (DeltaKind.LORA, DeltaKind.LOCON):
        return int(arrays["down"].shape[0])
    if kind is DeltaKind.LOHA:
        return int(arrays["hada_w1_b"].shape[0])
    if kind is DeltaKind.LOKR:
        for half in ("lokr_w1_b", "lokr_w2_b"):
            if half in arrays:
                return int(arrays[half].shape[0])
    return None


def kohya_scale(kind: DeltaKind, arrays: Mapping[str, np.ndarray], alpha: float | None) -> float:
    """alpha / rank as kohya and LyCORIS apply it: 1 without alpha (or alpha 0) or without a rank."""
    rank = rank_of(kind, arrays)
    if rank is None or not alpha:
        return 1.0
    return float(alpha) / rank


def natural_shape(kind: DeltaKind, arrays: Mapping[str, np.ndarray], what: str) -> tuple[int, ...]:
    """The shape the delta comes out in, before reshaping to the weight; AdapterError naming ``what``
    when the factors do not chain."""
    a = {role: tuple(int(d) for d in array.shape) for role, array in arrays.items()}
    if kind in (DeltaKind.LORA, DeltaKind.LOCON):
        return _lora_shape(a, arrays, what)
    if kind is DeltaKind.LOHA:
        return _loha_shape(a, arrays, what)
    if kind is DeltaKind.LOKR:
        return _lokr_shape(a, arrays, what)
    return a["diff"]


def _lora_shape(
    a: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray], what: str
) -> tuple[int, ...]:
    down, up = a["down"], a["up"]
    if len(down) < 2 or len(up) < 2:
        raise _mismatch(what, arrays, ("down", "up"))
    up_rank = math.prod(up[1:])
    if "mid" not in a:
        if up_rank != down[0]:
            raise _mismatch(what, arrays, ("down", "up"))
        return (up[0], *down[1:])
    mid = a["mid"]
    if len(mid) < 2 or mid[0] != up_rank or mid[1] != down[0] or math.prod(down[2:]) != 1:
        raise _mismatch(what, arrays, ("down", "mid", "up"))
    return (up[0], down[1], *mid[2:])


def _loha_shape(
    a: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray], what: str
) -> tuple[int, ...]:
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    w1a, w1b, w2a, w2b = (a[r] for r in roles)
    if any(len(s) < 2 for s in (w1a, w1b, w2a, w2b)):
        raise _mismatch(what, arrays, roles)
    if "hada_t1" in a:  # Tucker: wa (r, out), wb (r, in), t (r, r, kh, kw)
        halves = ((a["hada_t1"], w1a, w1b), (a["hada_t2"], w2a, w2b))
        chained = all(
            len(t) >= 2 and len(wa) == 2 and len(wb) == 2 and t[0] == wa[0] and t[1] == wb[0]
            for t, wa, wb in halves
        )
        rebuilt = {(wa[1], wb[1], *t[2:]) for t, wa, wb in halves}
        if not chained or len(rebuilt) != 1:
            raise _mismatch(what, arrays, (*roles, "hada_t1", "hada_t2"))
        return rebuilt.pop()
    if w1a[1] != w1b[0] or w2a[1] != w2b[0] or (w1a[0], *w1b[1:]) != (w2a[0], *w2b[1:]):
        raise _mismatch(what, arrays, roles)
    return (w1a[0], *w1b[1:])


def _lokr_half(a: Shapes, n: int) -> tuple[int, ...] | None:
    """A LoKr factor's shape; None when its product does not chain."""
    if f"lokr_w{n}" in a:
        return a[f"lokr_w{n}"]
    wa, wb = a[f"lokr_w{n}_a"], a[f"lokr_w{n}_b"]
    if n == 2 and "lokr_t2" in a:  # Tucker: wa (r, c), wb (r, d), t (r, r, kh, kw)
        t = a["lokr_t2"]
        ok = len(t) >= 2 and len(wa) == 2 and len(wb) == 2 and t[0] == wa[0] and t[1] == wb[0]
        return (wa[1], wb[1], *t[2:]) if ok else None
    if len(wa) != 2 or len(wb) < 2 or wa[1] != wb[0]:
        return None
    return (wa[0], *wb[1:])


def _lokr_shape(
    a: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray], what: str
) -> tuple[int, ...]:
    w1, w2 = _lokr_half(a, 1), _lokr_half(a, 2)
    if w1 is None or w2 is None or len(w1) != 2 or len(w2) < 2:
        raise _mismatch(what, arrays, tuple(sorted(arrays)))
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


# -- the deltas ---------------------------------------------------------------------------------


def _tucker(core: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """``sum_ab core[a, b, ...] wa[a, o] wb[b, i]`` -> (o, i, ...): LyCORIS's rebuild_tucker."""
    return np.einsum("ab...,ao,bi->oi...", _f32(core), _f32(wa), _f32(wb), optimize=True)


def _lora_delta(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    up = _matrix(arrays["up"])
    if "mid" not in arrays:
        return up @ _matrix(arrays["down"])
    return _tucker(arrays["mid"], up.T, _matrix(arrays["down"]))


def _loha_delta(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if "hada_t1" in arrays:
        first = _tucker(arrays["hada_t1"], arrays["hada_w1_a"], arrays["hada_w1_b"])
        second = _tucker(arrays["hada_t2"], arrays["hada_w2_a"], arrays["hada_w2_b"])
        return first * second
    first = _matrix(arrays["hada_w1_a"]) @ _matrix(arrays["hada_w1_b"])
    return first * (_matrix(arrays["hada_w2_a"]) @ _matrix(arrays["hada_w2_b"]))


def _lokr_factor(arrays: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """A LoKr factor as a matrix: (rows, everything else), Tucker halves rebuilt first."""
    if f"lokr_w{n}" in arrays:
        return _matrix(arrays[f"lokr_w{n}"])
    wa, wb = arrays[f"lokr_w{n}_a"], arrays[f"lokr_w{n}_b"]
    if n == 2 and "lokr_t2" in arrays:
        rebuilt = _tucker(arrays["lokr_t2"], wa, wb)
        return rebuilt.reshape(rebuilt.shape[0], -1)
    return _matrix(wa) @ _matrix(wb)


def _lokr_delta(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    # kron of (a, b) and (c, d*kh*kw) is (a*c, b*d*kh*kw): row-major, the same numbers as LyCORIS's
    # kron of (a, b, 1, 1) and (c, d, kh, kw) once reshaped to (a*c, b*d, kh, kw)
    return np.kron(_lokr_factor(arrays, 1), _lokr_factor(arrays, 2))


_DELTAS = {
    DeltaKind.LORA: _lora_delta,
    DeltaKind.LOCON: _lora_delta,
    DeltaKind.LOHA: _loha_delta,
    DeltaKind.LOKR: _lokr_delta,
    DeltaKind.FULL: lambda arrays: np.array(arrays["diff"], dtype=np.float32),  # a copy, never the file
}


@dataclass(frozen=True, eq=False)
class ModuleDelta:
    """One module's change, as a file stores it: factors, scale, and an optional DoRA magnitude.

    arrays: role -> factor (views of the file; see :data:`engine.adapters.keys.SUFFIX_ROLES`);
    scale: alpha / rank or the format's equivalent; magnitude: DoRA's per-channel norms (1-D float32)
    and magnitude_axis the weight axis they belong to (0 output channels, 1 input channels).
    """

    target: Target
    kind: DeltaKind
    keys: tuple[str, ...]
    arrays: Mapping[str, np.ndarray]
    scale: float
    shape: tuple[int, ...]  # the delta's shape before reshaping (natural_shape)
    magnitude: np.ndarray | None = None
    magnitude_axis: int | None = None

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 ``scale * dW`` at multiplier 1, reshaped to ``shape`` (the weight's torch shape).

        AdapterError when the delta has another number of elements."""
        if math.prod(self.shape) != math.prod(shape) or self.shape[0] != shape[0]:
            raise AdapterError(
                f"{self.keys[0]}: a {self.shape} delta does not fit {self.target[0].value} "
                f"{self.target[1]} {tuple(shape)}"
            )
        out = _DELTAS[self.kind](self.arrays)  # a new float32 array
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out.reshape(shape)


def magnitude_axis(
    magnitude: np.ndarray, weight_shape: tuple[int, ...], what: str, peft: bool = False
) -> int:
    """The weight axis a DoRA magnitude belongs to: kohya / LyCORIS ``dora_scale`` by its shape, 0 for
    ``(out, 1, ...)``, 1 for ``(1, in, ...)``; PEFT's ``lora_magnitude_vector`` (``peft``) is always per
    output channel, stored ``(out,)`` for Linear and ``(1, out, 1, 1)`` for conv. AdapterError naming
    ``what`` (the key) for any other shape."""
    shape = tuple(magnitude.shape)
    out, inputs = weight_shape[0], weight_shape[1]
    if peft:
        if magnitude.size != out:
            raise AdapterError(f"{what}: {shape} is not one DoRA magnitude per output channel ({out})")
        return 0
    if shape == (out,) or (len(shape) >= 2 and shape[0] == out and math.prod(shape[1:]) == 1):
        return 0
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inputs and math.prod(shape[2:]) == 1:
        return 1
    raise AdapterError(
        f"{what}: dora_scale {shape} is neither one magnitude per output channel ({out}) nor per input "
        f"channel ({inputs}) of the {tuple(weight_shape)} weight"
    )


def dora_change(base: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, axis: int) -> np.ndarray:
    """``W_dora - W`` with ``W_dora = magnitude * (W + delta) / ||W + delta||``, the norm over every
    axis but ``axis`` (0: per output channel, 1: per input channel). float32 in and out."""
    merged = base + delta
    others = tuple(a for a in range(merged.ndim) if a != axis)
    norm = np.sqrt(np.sum(np.square(merged, dtype=np.float32), axis=others, keepdims=True)) + _NORM_EPSILON
    shape = [1] * merged.ndim
    shape[axis] = -1
    return merged * (_f32(magnitude).reshape(shape) / norm) - base
