"""Matching LoRA keys to an engine's weights: spellings, LDM names, alphas and PEFT metadata, the base
family check, unused keys, errors; and ``merge_weight``'s arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.adapters import (
    AdapterError,
    Component,
    ModuleDelta,
    ldm_unet_paths,
    match_lora,
    merge_weight,
    read_lora,
)
from tests.adapters.lora_files import (
    SMALL_TARGETS,
    lora_factors,
    save_lora,
    write_kohya_lora,
    write_sd2_width_lora,
    write_sdxl_like_lora,
)

UNET, TE, TE2 = Component.UNET, Component.TEXT_ENCODER, Component.TEXT_ENCODER_2
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"


def seed_of(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def merged(path, targets, weights, multiplier=0.8) -> dict:
    match = match_lora(read_lora(path), targets, "sd1")
    assert match.unused_keys == ()
    return {d.target: merge_weight(weights[d.target], [(d, multiplier)]) for d in match.deltas}


@pytest.mark.parametrize("preset", ["tiny", "tiny-v", "sd15", "sd21"])
def test_ldm_paths_agree_with_the_checkpoint_key_map(preset):
    """Every LoRA-able UNet module's LDM name is the one the single-file checkpoint converter uses."""
    pytest.importorskip("torch")  # the converter's key map module imports it
    from engine.models.checkpoint.unet import unet_rules
    from engine.models.presets import preset_spec

    rules = unet_rules(preset_spec(preset).unet.config(), prefix="")
    expected = {
        rule.diffusers[0].removesuffix(".weight"): rule.ldm.removesuffix(".weight")
        for rule in rules
        if rule.diffusers[0].endswith(".weight") and "norm" not in rule.diffusers[0]
    }
    ours = ldm_unet_paths(expected)
    assert ours == expected


def test_ldm_names_and_2d_conv_factors_match_like_diffusers_names(tmp_path, rng, tiny_targets, tiny_weights):
    unet = {t: s for t, s in tiny_targets.items() if t[0] is UNET}
    seed = seed_of(rng)
    reference = merged(write_kohya_lora(tmp_path / "a.safetensors", unet, seed=seed), unet, tiny_weights)
    ldm = merged(
        write_kohya_lora(tmp_path / "b.safetensors", unet, seed=seed, ldm_names=True), unet, tiny_weights
    )
    flat = merged(
        write_kohya_lora(tmp_path / "c.safetensors", unet, seed=seed, conv_layout="2d"), unet, tiny_weights
    )
    assert reference.keys() == ldm.keys() == flat.keys() == unet.keys()
    for target in unet:
        np.testing.assert_array_equal(ldm[target], reference[target])
        np.testing.assert_array_equal(flat[target], reference[target])


def test_alpha_missing_means_rank_and_fp16_alphas_are_numbers(tmp_path, rng):
    rank = 4
    no_alpha = match_lora(
        read_lora(write_kohya_lora(tmp_path / "n.safetensors", SMALL_TARGETS, rank, None)),
        SMALL_TARGETS,
        "sd1",
    )
    assert {d.scale for d in no_alpha.deltas} == {1.0}
    for delta in no_alpha.deltas:
        up, down = delta.arrays["up"], delta.arrays["down"]
        expected = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(SMALL_TARGETS[delta.target])
        np.testing.assert_allclose(delta.delta(SMALL_TARGETS[delta.target]), expected, rtol=1e-6)
    path = write_kohya_lora(tmp_path / "h.safetensors", SMALL_TARGETS, rank, 0.3, alpha_dtype=np.float16)
    half = match_lora(read_lora(path), SMALL_TARGETS, "sd1")
    assert {d.scale for d in half.deltas} == {float(np.float16(0.3)) / rank}


def test_every_spelling_of_diffusers_and_peft_matches(tmp_path, rng):
    q, k = f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_k"
    spellings = {
        f"unet.{q}.lora_A.weight": (UNET, q, "down"),
        f"unet.{q}.lora_B.weight": (UNET, q, "up"),
        f"unet.{ATTN}.attn2.processor.to_k_lora.down.weight": (UNET, k, "down"),  # diffusers' first format
        f"unet.{ATTN}.attn2.processor.to_k_lora.up.weight": (UNET, k, "up"),
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": (
            UNET,
            "down_blocks.0.resnets.0.conv1",
            "down",
        ),
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": (UNET, "down_blocks.0.resnets.0.conv1", "up"),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": (
            TE,
            "encoder.layers.0.self_attn.q_proj",
            "down",
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": (
            TE,
            "encoder.layers.0.self_attn.q_proj",
            "up",
        ),
        "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": (
            TE,
            "encoder.layers.0.mlp.fc1",
            "down",
        ),
        "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": (
            TE,
            "encoder.layers.0.mlp.fc1",
            "up",
        ),
    }
    factors = {}
    tensors = {}
    for key, (component, path, role) in spellings.items():
        target = (component, path)
        factors.setdefault(target, lora_factors(rng, SMALL_TARGETS[target], 2))
        tensors[key] = factors[target][f"lora_{role}.weight"]
    match = match_lora(read_lora(save_lora(tmp_path / "p.safetensors", tensors)), SMALL_TARGETS, "sd1")
    assert match.unused_keys == () and match.matched == match.total == 5
    assert {d.target for d in match.deltas} == set(factors)


def test_peft_metadata_sets_alpha_patterns_and_rslora(tmp_path, rng):
    """diffusers' lora_adapter_metadata: lora_alpha / r, alpha_pattern matched as PEFT does, rsLoRA."""
    rank = 4
    tensors = {}
    for target, shape in SMALL_TARGETS.items():
        prefix = "unet." if target[0] is UNET else "text_encoder."
        for role, array in lora_factors(rng, shape, rank).items():
            tensors[
                f"{prefix}{target[1]}.{role.replace('lora_down', 'lora_A').replace('lora_up', 'lora_B')}"
            ] = array
    config = {
        "unet.r": rank,
        "unet.lora_alpha": 8,
        "unet.alpha_pattern": {"attn2.to_k": 2, "conv1": 1},
        "unet.rank_pattern": {},
        "text_encoder.r": rank,
        "text_encoder.lora_alpha": 4,
        "text_encoder.use_rslora": True,
    }
    metadata = {"lora_adapter_metadata": json.dumps(config), "format": "pt"}
    match = match_lora(
        read_lora(save_lora(tmp_path / "m.safetensors", tensors, metadata)), SMALL_TARGETS, "sd1"
    )
    scales = {d.target[1].rsplit(".", 1)[-1]: d.scale for d in match.deltas}
    assert scales == {
        "to_q": 2.0,
        "to_k": 0.5,
        "proj_in": 2.0,
        "conv1": 0.25,
        "conv_shortcut": 2.0,
        "q_proj": 2.0,
        "fc1": 2.0,
    }
    without = match_lora(read_lora(save_lora(tmp_path / "w.safetensors", tensors)), SMALL_TARGETS, "sd1")
    assert {d.scale for d in without.deltas} == {1.0}  # diffusers' reading: alpha = rank


FAMILY_CASES = {
    "sdxl-keys": (
        "sdxl",
        "0 of 4 modules matched; this looks like an SDXL LoRA (lora_te1_ keys), and this engine is SD 1.x",
    ),
    "sd2-width": (
        "sd2",
        "this looks like an SD 2.x LoRA (1024-wide text encoder), and this engine is SD 1.x",
    ),
    "cross-attention": ("xattn", "this looks like an SDXL LoRA (2048-wide cross-attention)"),
    "deep-blocks": ("deep", "more than one transformer block per attention"),
    "metadata": ("meta", "this looks like an SD 2.x LoRA (metadata ss_base_model_version=sd_v2)"),
}


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_another_family_is_refused_in_one_line(tmp_path, rng, case):
    kind, expected = FAMILY_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    if kind == "sdxl":
        write_sdxl_like_lora(path)
    elif kind == "sd2":
        write_sd2_width_lora(path, SMALL_TARGETS)
    elif kind == "xattn":
        factors = lora_factors(rng, (16, 2048), 1)
        save_lora(path, {f"lora_unet_{ATTN.replace('.', '_')}_attn2_to_k.{k}": v for k, v in factors.items()})
    elif kind == "deep":
        factors = lora_factors(rng, (16, 16), 1)
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q"
        save_lora(path, {f"{name}.{k}": v for k, v in factors.items()})
    else:
        write_kohya_lora(path, SMALL_TARGETS, metadata={"ss_base_model_version": "sd_v2"})
    with pytest.raises(AdapterError) as error:
        match_lora(read_lora(path), SMALL_TARGETS, "sd1")
    assert expected in one_line(error) and path.name in str(error.value)


def test_an_sdxl_lora_matches_both_text_encoders_of_an_sdxl_engine(tmp_path):
    targets = {
        (TE, "encoder.layers.0.self_attn.q_proj"): (768, 768),
        (TE2, "encoder.layers.0.self_attn.q_proj"): (1280, 1280),
    }
    match = match_lora(read_lora(write_sdxl_like_lora(tmp_path / "xl.safetensors")), targets, "sdxl")
    assert {d.target for d in match.deltas} == set(targets) and (match.matched, match.total) == (2, 4)
    assert all(key.startswith("lora_unet_") for key in match.unused_keys)


def test_every_key_is_applied_or_reported_unused(tmp_path, rng):
    extra = {
        "lora_unet_down_blocks_0_resnets_0_conv1.diff_b": np.zeros(16, np.float32),  # a bias diff
        "bundle_emb.mytoken.string_to_param.*": np.zeros((2, 32), np.float32),  # a bundled embedding
        "lora_unet_up_blocks_9_resnets_0_conv1.lora_down.weight": np.zeros(
            (2, 8), np.float32
        ),  # no such module
        "lora_unet_up_blocks_9_resnets_0_conv1.lora_up.weight": np.zeros((16, 2), np.float32),
        "lora_unet_up_blocks_9_resnets_0_conv1.alpha": np.float32(2),
        "lora_te_text_model_encoder_layers_5_mlp_fc2.alpha": np.float32(2),  # an alpha alone
        "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": np.zeros(
            (2, 8), np.float32
        ),  # half a LoRA
        "lora_unet_mid_block_attentions_0_proj_out.oft_blocks": np.zeros((2, 4, 4), np.float32),
        "stray": np.zeros(1, np.float32),
    }
    path = write_kohya_lora(tmp_path / "x.safetensors", SMALL_TARGETS, seed=seed_of(rng), extra=extra)
    lora = read_lora(path)
    match = match_lora(lora, SMALL_TARGETS, "sd1")
    applied = [key for delta in match.deltas for key in delta.keys]
    assert sorted(match.unused_keys) == sorted(extra)
    assert sorted(applied + list(match.unused_keys)) == sorted(lora.tensors)  # a partition of the file
    assert (match.matched, match.total) == (len(SMALL_TARGETS), len(SMALL_TARGETS) + 1)


def test_file_errors_are_one_line(tmp_path, rng):
    q = f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q"
    down, up = np.ones((2, 16), np.float32), np.ones((16, 2), np.float32)
    cases = {
        "lyco-oft": (
            {f"{q}.oft_blocks": np.zeros((4, 4, 4), np.float32)},
            "LyCORIS OFT modules, which sd-engine does not apply",
        ),
        "no-lora": ({"something.weight": down}, "no LoRA weights"),
        "empty": ({}, "the file holds no tensors"),
        "other-names": (
            {"lora_unet_foo.lora_down.weight": down, "lora_unet_foo.lora_up.weight": up},
            "0 of 1 modules matched this SD 1.x engine's UNet and text encoder (e.g. lora_unet_foo)",
        ),
        "mixed": (
            {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up, f"{q}.hada_w1_a": up},
            "mixes loha and lora keys",
        ),
        "unchained": (
            {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": np.ones((16, 3), np.float32)},
            "factors do not chain (down (2, 16), up (16, 3))",
        ),
        "dora": (
            {
                f"{q}.lora_down.weight": down,
                f"{q}.lora_up.weight": up,
                f"{q}.dora_scale": np.ones((1, 5), np.float32),
            },
            "dora_scale (1, 5) is neither",
        ),
        "alpha": (
            {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up, f"{q}.alpha": np.ones(3, np.float32)},
            "alpha has shape (3,)",
        ),
        "shape": (
            {f"{q}.lora_down.weight": np.ones((2, 12), np.float32), f"{q}.lora_up.weight": up},
            f"{q} is a (16, 12) delta, but the engine's unet {ATTN}.attn1.to_q is (16, 16)",
        ),
    }
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}
    flux["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = up
    cases["flux"] = (
        flux,
        "(e.g. lora_unet_double_blocks_0_img_attn_qkv); its metadata says ss_base_model_version=flux1",
    )
    for name, (tensors, expected) in cases.items():
        metadata = {"ss_base_model_version": "flux1"} if name == "flux" else None
        path = save_lora(tmp_path / f"{name}.safetensors", tensors, metadata)
        with pytest.raises(AdapterError) as error:
            match_lora(read_lora(path), SMALL_TARGETS, "sd1")
        assert expected in one_line(error), name
        assert str(error.value).startswith(path.name), name


def test_merge_weight_sums_parts_and_keeps_the_base(tmp_path, rng):
    target = (UNET, "down_blocks.0.resnets.0.conv1")
    shape = SMALL_TARGETS[target]
    base = rng.standard_normal(shape).astype(np.float16)
    base.flags.writeable = False  # as a read-only memmap of the engine's weights would be
    before = base.copy()
    a, b = (
        match_lora(
            read_lora(write_kohya_lora(tmp_path / f"{n}.safetensors", {target: shape}, seed=s)),
            SMALL_TARGETS,
            "sd1",
        ).deltas[0]
        for n, s in (("a", seed_of(rng)), ("b", seed_of(rng)))
    )
    out = merge_weight(base, [(a, 0.5), (b, -0.25)])
    expected = base.astype(np.float32) + 0.5 * a.delta(shape) - 0.25 * b.delta(shape)
    assert out.dtype == np.float16 and out.shape == shape
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(base, before)
    np.testing.assert_array_equal(merge_weight(base, [(a, 0.0)]), base)
    np.testing.assert_array_equal(merge_weight(base, []), base)
    assert merge_weight(base.astype(np.float64), [(a, 1.0)]).dtype == np.float64


def test_dora_parts_are_taken_from_the_original_weight(tmp_path, rng):
    target = (TE, "encoder.layers.0.mlp.fc1")
    shape = SMALL_TARGETS[target]
    base = rng.standard_normal(shape).astype(np.float32)
    path = write_kohya_lora(
        tmp_path / "d.safetensors", {target: shape}, seed=seed_of(rng), dora="in", base_weights={target: base}
    )
    dora = match_lora(read_lora(path), SMALL_TARGETS, "sd1").deltas[0]
    plain = ModuleDelta(**{**dora.__dict__, "magnitude": None, "magnitude_axis": None})
    one_way = merge_weight(base, [(dora, 0.7), (plain, 0.4)])
    other_way = merge_weight(base, [(plain, 0.4), (dora, 0.7)])
    np.testing.assert_allclose(one_way, other_way, rtol=1e-6, atol=1e-6)
    alone = merge_weight(base, [(dora, 0.7)])
    np.testing.assert_allclose(one_way - alone, 0.4 * plain.delta(shape), rtol=1e-4, atol=1e-5)


def test_full_diffs_apply_as_stored(tmp_path, rng):
    """LyCORIS "full" modules store dW itself (``diff``); bias diffs (``diff_b``) are reported unused."""
    name = f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q"
    diff = rng.standard_normal((16, 16)).astype(np.float16)
    tensors = {f"{name}.diff": diff, f"{name}.diff_b": np.ones(16, np.float16)}
    match = match_lora(read_lora(save_lora(tmp_path / "full.safetensors", tensors)), SMALL_TARGETS, "sd1")
    (delta,) = match.deltas
    assert delta.kind == "full" and match.unused_keys == (f"{name}.diff_b",)
    base = np.zeros((16, 16), np.float32)
    np.testing.assert_array_equal(merge_weight(base, [(delta, 0.5)]), 0.5 * diff.astype(np.float32))
    np.testing.assert_array_equal(delta.arrays["diff"], diff)  # the file's view was not scaled in place
