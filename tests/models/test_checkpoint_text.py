"""Text-encoder key maps: SD 1 CLIP (with and without ``text_model.``) and SD 2 OpenCLIP (fused q/k/v)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import Transform, apply_rules, invert_rules
from engine.models.checkpoint.text import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    clip_checkpoint_prefix,
    clip_rules,
    clip_unused_keys,
    openclip_rules,
    openclip_unused_keys,
    text_model_prefix,
)
from engine.models.presets import preset_spec, text_encoder_config


def config_of(preset: str) -> dict:
    return text_encoder_config(preset_spec(preset)).to_diff_dict()


def meta_model(config: dict) -> CLIPTextModel:
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**config))


def random_model(config: dict, rng: np.random.Generator) -> CLIPTextModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**31)))
        return CLIPTextModel(CLIPTextConfig(**config)).eval()


@pytest.mark.parametrize("preset", ["tiny", "sd15", "tiny-v", "sd21"])
@pytest.mark.parametrize("openclip", [False, True])
def test_rules_name_every_weight_of_the_model(preset: str, openclip: bool) -> None:
    config = config_of(preset)
    model = meta_model(config)
    target = text_model_prefix(model)
    rules = (
        openclip_rules(config, target_prefix=target) if openclip else clip_rules(config, target_prefix=target)
    )
    mapped = sorted(name for rule in rules for name in rule.diffusers)
    assert mapped == sorted(n for n in model.state_dict() if not n.endswith("position_ids"))
    assert len({rule.ldm for rule in rules}) == len(rules)


def test_transformers_5_names_have_no_text_model_level() -> None:
    """What load_state_dict on the built model expects decides the target names."""
    model = meta_model(config_of("tiny"))
    assert text_model_prefix(model) == ""
    assert "embeddings.token_embedding.weight" in model.state_dict()


def test_sd15_and_sd21_checkpoint_names() -> None:
    """196 CLIP tensors (12 layers) for SD 1.5; OpenCLIP names with fused in_proj for SD 2.1 (23 blocks)."""
    sd15 = {rule.ldm: rule for rule in clip_rules(config_of("sd15"), CLIP_PREFIX + "text_model.")}
    assert len(sd15) == 196
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias" in sd15
    sd21 = {rule.ldm: rule for rule in openclip_rules(config_of("sd21"))}
    assert len(sd21) == 2 + 23 * 12 + 2
    fused = sd21["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"]
    assert fused.transform is Transform.SPLIT_QKV
    assert fused.diffusers == tuple(f"encoder.layers.22.self_attn.{p}_proj.weight" for p in "qkv")
    assert sd21["cond_stage_model.model.positional_embedding"].diffusers == (
        "embeddings.position_embedding.weight",
    )
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" not in sd21


@pytest.mark.parametrize("with_level", [True, False])
def test_clip_round_trip_and_prefix_detection(with_level: bool, rng: np.random.Generator) -> None:
    config = config_of("tiny")
    state = random_model(config, rng).state_dict()
    prefix = CLIP_PREFIX + ("text_model." if with_level else "")
    ldm = invert_rules(state, clip_rules(config, prefix))
    assert all(key.startswith(prefix) for key in ldm)
    assert clip_checkpoint_prefix(ldm) == prefix
    back = apply_rules(ldm, clip_rules(config, clip_checkpoint_prefix(ldm)))
    assert back.used == frozenset(ldm)
    for name, tensor in back.state_dict.items():
        assert torch.equal(tensor, state[name]), name


def test_clip_prefix_detection_refuses_a_mix() -> None:
    keys = [f"{CLIP_PREFIX}text_model.final_layer_norm.weight", f"{CLIP_PREFIX}final_layer_norm.bias"]
    with pytest.raises(ModelFolderError, match="mixes names with and without"):
        clip_checkpoint_prefix(keys)


def test_openclip_fused_projection_runs_like_multihead_attention(rng: np.random.Generator) -> None:
    """Independent of the map's own inverse: OpenCLIP's fused in_proj in torch.nn.MultiheadAttention
    (what open_clip runs) gives the same attention as the split CLIP layer."""
    config = config_of("tiny-v")
    model = random_model(config, rng)
    ldm = invert_rules(model.state_dict(), openclip_rules(config, ""))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    attention = torch.nn.MultiheadAttention(hidden, heads, batch_first=True)
    block = "transformer.resblocks.1.attn."
    attention.load_state_dict(
        {
            "in_proj_weight": ldm[block + "in_proj_weight"],
            "in_proj_bias": ldm[block + "in_proj_bias"],
            "out_proj.weight": ldm[block + "out_proj.weight"],
            "out_proj.bias": ldm[block + "out_proj.bias"],
        }
    )
    x = torch.from_numpy(rng.standard_normal((2, 7, hidden)).astype(np.float32))
    with torch.no_grad():
        expected, _ = attention(x, x, x, need_weights=False)
        actual = model.encoder.layers[1].self_attn(x)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_openclip_round_trip(rng: np.random.Generator) -> None:
    config = config_of("tiny-v")
    state = random_model(config, rng).state_dict()
    ldm = invert_rules(state, openclip_rules(config))
    assert ldm[f"{OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    back = apply_rules(ldm, openclip_rules(config))
    assert back.used == frozenset(ldm)
    for name, tensor in back.state_dict.items():
        assert torch.equal(tensor, state[name]), name


def test_unused_text_keys_are_only_the_known_ones() -> None:
    config = config_of("sd21")  # 23 layers: block 23 (the 24th) is stored, never run
    keys = [
        f"{OPENCLIP_PREFIX}transformer.resblocks.23.ln_1.weight",
        f"{OPENCLIP_PREFIX}transformer.resblocks.24.ln_1.weight",
        f"{OPENCLIP_PREFIX}transformer.resblocks.22.ln_1.weight",
        f"{OPENCLIP_PREFIX}text_projection",
        f"{OPENCLIP_PREFIX}logit_scale",
        f"{OPENCLIP_PREFIX}transformer.resblocks.2.ln_1.weight",
    ]
    assert openclip_unused_keys(config, keys) == frozenset(
        {keys[0], f"{OPENCLIP_PREFIX}text_projection", f"{OPENCLIP_PREFIX}logit_scale"}
    )
    assert clip_unused_keys(CLIP_PREFIX + "text_model.") == frozenset(
        {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    )


def test_bad_layer_count_is_one_line() -> None:
    with pytest.raises(ModelFolderError, match="num_hidden_layers"):
        clip_rules({"num_hidden_layers": "12"})
