"""Per-format deltas against the lycoris-lora package's own functions; DoRA against LyCORIS and PEFT.

Each test writes a file the way the trainer does (tests/adapters/lora_files.py), reads it back through
``read_lora`` / ``match_lora`` and compares ``ModuleDelta.delta`` (and ``merge_weight`` for DoRA) with
LyCORIS's ``diff_weight`` / ``weight_decompose`` / ``apply_dora_scale`` and PEFT's merged DoRA weight
on the same numbers, within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.adapters import Component, DeltaKind, ModuleDelta, match_lora, merge_weight, read_lora
from tests.adapters.lora_files import (
    SMALL_TARGETS,
    kohya_name,
    save_lora,
    write_kohya_lora,
    write_loha,
    write_lokr,
)

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris", reason="lycoris-lora (the dev extra) is the reference for LyCORIS formats")
from lycoris.functional import locon, loha, lokr  # noqa: E402
from lycoris.functional.general import apply_dora_scale, weight_decompose  # noqa: E402


def seed_of(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def read_deltas(path) -> tuple[dict, dict]:
    """(target -> ModuleDelta, key -> tensor) of a file matched against SMALL_TARGETS; no key unused."""
    lora = read_lora(path)
    match = match_lora(lora, SMALL_TARGETS, "sd1")
    assert match.unused_keys == ()
    assert match.matched == match.total == len(SMALL_TARGETS)
    return {d.target: d for d in match.deltas}, lora.tensors


def t(tensors, key: str):
    """A file tensor as float32 torch (None when the file has no such key)."""
    return torch.from_numpy(np.array(tensors[key], dtype=np.float32)) if key in tensors else None


def assert_close(ours: np.ndarray, reference) -> None:
    reference = reference.detach().numpy() if hasattr(reference, "detach") else np.asarray(reference)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))


@pytest.mark.parametrize("mid", [False, True], ids=["lora", "locon-tucker-mid"])
def test_lora_and_locon_equal_lycoris(tmp_path, rng, mid):
    rank, alpha = 3, 2.0
    path = write_kohya_lora(tmp_path / "l.safetensors", SMALL_TARGETS, rank, alpha, seed_of(rng), mid=mid)
    deltas, tensors = read_deltas(path)
    for target, shape in SMALL_TARGETS.items():
        name = kohya_name(target)
        down, up, core = (t(tensors, f"{name}.lora_{part}.weight") for part in ("down", "up", "mid"))
        reference = locon.diff_weight(down, up, core, gamma=alpha / rank, backend="torch")
        assert deltas[target].kind is (DeltaKind.LOCON if core is not None else DeltaKind.LORA)
        assert_close(deltas[target].delta(shape), reference.reshape(shape))
    assert any(d.kind is DeltaKind.LOCON for d in deltas.values()) == mid  # the 3x3 conv has a mid


@pytest.mark.parametrize("tucker", [False, True], ids=["loha", "loha-tucker"])
def test_loha_equals_lycoris(tmp_path, rng, tucker):
    rank, alpha = 3, 1.5
    path = write_loha(tmp_path / "h.safetensors", SMALL_TARGETS, rank, alpha, seed_of(rng), tucker=tucker)
    deltas, tensors = read_deltas(path)
    for target, shape in SMALL_TARGETS.items():
        name = kohya_name(target)
        w1a, w1b, w2a, w2b, t1, t2 = (
            t(tensors, f"{name}.hada_{part}") for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
        )
        gamma = torch.tensor(alpha / rank)
        reference = loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=gamma, backend="torch")
        assert_close(deltas[target].delta(shape), reference.reshape(shape))
    assert any(f"{kohya_name(t)}.hada_t1" in tensors for t in SMALL_TARGETS) == tucker


LOKR_LAYOUTS = {
    "whole": {"decompose_w1": False, "decompose_w2": False},
    "w2-factorised": {"decompose_w1": False, "decompose_w2": True},
    "both-factorised": {"decompose_w1": True, "decompose_w2": True},  # the lokr_w1_a spelling
    "tucker": {"decompose_w1": False, "decompose_w2": True, "tucker": True},
}


@pytest.mark.parametrize("layout", LOKR_LAYOUTS)
def test_lokr_equals_lycoris(tmp_path, rng, layout):
    rank, alpha = 2, 3.0
    path = write_lokr(
        tmp_path / "k.safetensors", SMALL_TARGETS, rank, alpha, seed_of(rng), **LOKR_LAYOUTS[layout]
    )
    deltas, tensors = read_deltas(path)
    for target, shape in SMALL_TARGETS.items():
        name = kohya_name(target)
        parts = [t(tensors, f"{name}.lokr_{p}") for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")]
        if parts[6] is None:
            # LyCORIS's diff_weight takes gamma = alpha and divides by the factorised half's rank (1 for
            # whole halves: no alpha / rank scale at all)
            reference = lokr.diff_weight(*parts, gamma=alpha, backend="torch")
        else:
            # A Tucker w2's lokr_w2_a is (r, c): LyCORIS's diff_weight reads its rank off w2_a.shape[1]
            # (= c), where its training code, A1111 and ComfyUI divide by r; compare kron at alpha / r
            reference = lokr.kron_weight(*parts, scale=alpha / rank, backend="torch")
        expected_scale = 1.0 if layout == "whole" else alpha / rank
        assert deltas[target].kind is DeltaKind.LOKR and deltas[target].scale == pytest.approx(expected_scale)
        assert_close(deltas[target].delta(shape), reference.reshape(shape))


def base_weights(rng: np.random.Generator) -> dict:
    return {t: (rng.standard_normal(shape) * 0.2).astype(np.float32) for t, shape in SMALL_TARGETS.items()}


@pytest.mark.parametrize("layout", ["out", "in"])
def test_dora_scale_equals_lycoris(tmp_path, rng, layout):
    """Both magnitude layouts: per output channel (out, 1[, 1, 1]) and per input channel (1, in[, 1, 1])."""
    rank, alpha = 3, 2.0
    base = base_weights(rng)
    path = write_kohya_lora(
        tmp_path / "d.safetensors", SMALL_TARGETS, rank, alpha, seed_of(rng), dora=layout, base_weights=base
    )
    deltas, tensors = read_deltas(path)
    for target, shape in SMALL_TARGETS.items():
        name = kohya_name(target)
        delta = deltas[target]
        assert delta.magnitude is not None and f"{name}.dora_scale" in delta.keys
        plain = locon.diff_weight(
            t(tensors, f"{name}.lora_down.weight"),
            t(tensors, f"{name}.lora_up.weight"),
            None,
            gamma=alpha / rank,
        ).reshape(shape)
        weight, magnitude = torch.from_numpy(base[target]), t(tensors, f"{name}.dora_scale")
        full = weight_decompose(weight + plain, magnitude, 1, wd_on_out=layout == "out", backend="torch")
        assert_close(merge_weight(base[target], [(delta, 1.0)]), full)
        # at multiplier m: W + m * (W_dora - W), LyCORIS's apply_dora_scale (which norms per input channel)
        partial = (
            apply_dora_scale(weight, plain, magnitude, 0.6)
            if layout == "in"
            else weight + 0.6 * (full - weight)
        )
        assert_close(merge_weight(base[target], [(delta, 0.6)]), partial)
        without_dora = ModuleDelta(**{**delta.__dict__, "magnitude": None, "magnitude_axis": None})
        assert not np.allclose(
            merge_weight(base[target], [(delta, 1.0)]), merge_weight(base[target], [(without_dora, 1.0)])
        )


def test_peft_dora_magnitude_equals_peft_merge(tmp_path):
    """PEFT's DoRA (``lora_magnitude_vector``, per output channel) merged by PEFT itself, Linear and conv."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(12, 16))
    model.add_module("conv", torch.nn.Conv2d(8, 16, 3))
    config = LoraConfig(
        r=3, lora_alpha=6, target_modules=["proj", "conv"], use_dora=True, init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    for name in ("proj", "conv"):
        layer = getattr(peft_model.base_model.model, name)
        magnitude = layer.lora_magnitude_vector["default"].weight.data  # (16,) Linear, (1, 16, 1, 1) conv
        magnitude *= (torch.rand(16) + 0.5).reshape(magnitude.shape)  # as if trained
    tensors = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    # PEFT keeps alpha in its config; a file may carry it as `.alpha` keys (scale 6 / 3 here)
    tensors.update({f"base_model.model.{name}.alpha": np.array(6.0, np.float32) for name in ("proj", "conv")})
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    base = {name: getattr(model, name).weight.detach().numpy().copy() for name in ("proj", "conv")}
    merged = peft_model.merge_and_unload()
    lora = read_lora(save_lora(tmp_path / "peft-dora.safetensors", tensors))
    targets = {(Component.UNET, name): weight.shape for name, weight in base.items()}
    for delta in match_lora(lora, targets, "sd1").deltas:
        name = delta.target[1]
        assert delta.magnitude_axis == 0
        assert_close(merge_weight(base[name], [(delta, 1.0)]), getattr(merged, name).weight)
