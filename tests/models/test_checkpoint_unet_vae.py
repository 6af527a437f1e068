"""UNet / VAE key maps against diffusers' own single-file loader, and VAE swaps (read_vae)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import apply_rules
from engine.models.checkpoint.unet import unet_rules
from engine.models.checkpoint.vae import (
    VaeAttention,
    VaeKind,
    read_vae,
    vae_attention,
    vae_rules,
    vae_shapes,
)
from engine.models.presets import preset_spec
from tests.models.ldm import unet_to_ldm, vae_to_ldm

DTYPES = (torch.float32, torch.float16)


def save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float32) -> Path:
    save_file({k: t.to(dtype).contiguous() for k, t in tensors.items()}, path)
    return path


def assert_same(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Equal names, and values equal to ``expected`` rounded through ``dtype``."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name].float(), tensor.to(dtype).float()), name


@pytest.fixture(scope="module", params=["tiny", "tiny-v"])
def model(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_model" if request.param == "tiny" else "tiny_v_model")


@pytest.fixture(scope="module")
def tiny_vae(tiny_model: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(tiny_model / "vae")


# --- the rules cover every tensor of the real-size and tiny architectures -----------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-v", "sd15", "sd21"])
def test_unet_rules_name_every_tensor(preset: str) -> None:
    config = preset_spec(preset).unet.config()
    with torch.device("meta"):
        names = set(UNet2DConditionModel.from_config(config).state_dict())
    rules = unet_rules(config)
    mapped = [name for rule in rules for name in rule.diffusers]
    assert sorted(mapped) == sorted(names)
    assert len({rule.ldm for rule in rules}) == len(rules)
    assert all(rule.ldm.startswith("model.diffusion_model.") for rule in rules)


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_unet_rules_use_sd_checkpoint_names(preset: str) -> None:
    """Names as in v1-5-pruned / v2-1_768-ema-pruned: 686 UNet tensors, upsamplers at .1 / .2.conv."""
    ldm = {
        rule.ldm.removeprefix("model.diffusion_model."): rule
        for rule in unet_rules(preset_spec(preset).unet.config())
    }
    assert len(ldm) == 686
    assert ldm["output_blocks.2.1.conv.weight"].diffusers == ("up_blocks.0.upsamplers.0.conv.weight",)
    assert ldm["output_blocks.5.2.conv.bias"].diffusers == ("up_blocks.1.upsamplers.0.conv.bias",)
    assert ldm["input_blocks.9.0.op.weight"].diffusers == ("down_blocks.2.downsamplers.0.conv.weight",)
    assert ldm["input_blocks.4.0.skip_connection.weight"].diffusers == (
        "down_blocks.1.resnets.0.conv_shortcut.weight",
    )
    assert ldm["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].diffusers == (
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    )
    assert "out.2.weight" in ldm and "time_embed.2.bias" in ldm


@pytest.mark.parametrize("preset", ["tiny", "sd15"])
@pytest.mark.parametrize("attention", ["ldm", "diffusers"])
def test_vae_rules_name_every_tensor(preset: str, attention: str) -> None:
    config = preset_spec(preset).vae.config()
    rules = vae_rules(config, attention=attention)
    assert sorted(n for rule in rules for n in rule.diffusers) == sorted(vae_shapes(config))
    assert len({rule.ldm for rule in rules}) == len(rules)
    ldm = {rule.ldm: rule for rule in rules}
    q = "first_stage_model.decoder.mid.attn_1." + ("q" if attention == "ldm" else "to_q") + ".weight"
    assert ldm[q].diffusers == ("decoder.mid_block.attentions.0.to_q.weight",)
    top = len(config["block_out_channels"]) - 1  # LDM's decoder levels run the other way
    assert ldm[f"first_stage_model.decoder.up.{top}.block.0.conv1.weight"].diffusers == (
        "decoder.up_blocks.0.resnets.0.conv1.weight",
    )
    if preset == "sd15":
        assert len(rules) == 248  # first_stage_model.* tensors in an SD 1.x / 2.x checkpoint


def test_unet_rules_reject_other_architectures() -> None:
    config = {**preset_spec("tiny").unet.config(), "addition_embed_type": "text_time"}
    with pytest.raises(ModelFolderError, match="not a Stable Diffusion"):
        unet_rules(config)


# --- round trips through diffusers' own from_single_file ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_checkpoint_round_trip(model: Path, dtype: torch.dtype, tmp_path: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    ldm = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    checkpoint = save(ldm, tmp_path / "model.safetensors", dtype)
    kwargs = {"config": str(model), "local_files_only": True}
    from_unet = UNet2DConditionModel.from_single_file(str(checkpoint), subfolder="unet", **kwargs)
    from_vae = AutoencoderKL.from_single_file(str(checkpoint), subfolder="vae", **kwargs)
    assert_same(from_unet.state_dict(), unet.state_dict(), dtype)
    assert_same(from_vae.state_dict(), vae.state_dict(), dtype)

    from safetensors.torch import load_file

    tensors = load_file(checkpoint)
    ours_unet = apply_rules(tensors, unet_rules(unet.config))
    ours_vae = apply_rules(tensors, vae_rules(vae.config, attention=vae_attention(tensors)))
    assert ours_unet.used | ours_vae.used == set(tensors)
    assert_same(ours_unet.state_dict, unet.state_dict(), dtype)
    assert_same(ours_vae.state_dict, vae.state_dict(), dtype)


def test_sd2_projection_accepts_conv_shape(tiny_v_model: Path) -> None:
    """SD 2 proj_in / proj_out are Linear; a (C, C, 1, 1) copy maps to the same tensor."""
    unet = UNet2DConditionModel.from_pretrained(tiny_v_model / "unet")
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    name = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert ldm[name].ndim == 2
    ldm[name] = ldm[name][:, :, None, None]
    converted = apply_rules(ldm, unet_rules(unet.config)).state_dict
    assert torch.equal(
        converted["down_blocks.0.attentions.0.proj_in.weight"],
        unet.state_dict()["down_blocks.0.attentions.0.proj_in.weight"],
    )


# --- read_vae ----------------------------------------------------------------------------------


def tiny_config() -> dict:
    return preset_spec("tiny").vae.config()


def test_read_vae_folder(tiny_model: Path, tiny_vae: AutoencoderKL) -> None:
    for path in (tiny_model / "vae", tiny_model):
        weights = read_vae(path)
        assert weights.kind is VaeKind.DIFFUSERS_FOLDER and weights.source == tiny_model / "vae"
        assert weights.config["block_out_channels"] == [32, 32, 64, 64]
        assert_same(weights.state_dict, tiny_vae.state_dict(), torch.float32)


def test_read_vae_folder_fp16_old_attention_names(tiny_vae: AutoencoderKL, tmp_path: Path) -> None:
    """A 2022 diffusers VAE folder: fp16 variant only, query / key / value / proj_attn names."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {
        re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{old[m[1]]}.", k): t
        for k, t in tiny_vae.state_dict().items()
    }
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    save(tensors, tmp_path / "diffusion_pytorch_model.fp16.safetensors", torch.float16)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **tiny_config()}))
    weights = read_vae(tmp_path)
    assert all(t.dtype == torch.float32 for t in weights.state_dict.values())
    assert_same(weights.state_dict, tiny_vae.state_dict(), torch.float16)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."], ids=["bare", "prefixed"])
@pytest.mark.parametrize("attention", ["ldm", "diffusers"])
def test_read_vae_single_file(tiny_vae: AutoencoderKL, prefix: str, attention: str, tmp_path: Path) -> None:
    ldm = vae_to_ldm(tiny_vae.state_dict(), tiny_vae.config, attention, prefix)
    assert ldm[f"{prefix}encoder.mid.attn_1.{'q' if attention == 'ldm' else 'to_q'}.weight"].ndim == (
        4 if attention == "ldm" else 2
    )
    extra = {"model_ema.decay": torch.tensor(0.999), "loss.logvar": torch.zeros(())}
    if prefix:  # a full checkpoint: the other components are not the VAE's business
        extra = {"model.diffusion_model.out.2.bias": torch.zeros(4), "cond_stage_model.x": torch.zeros(1)}
    path = save({**ldm, **extra}, tmp_path / "vae.safetensors", torch.float16)
    assert vae_attention(ldm, prefix) is VaeAttention(attention)
    weights = read_vae(path, tiny_config())
    assert weights.kind is VaeKind.SINGLE_FILE and weights.source == path
    assert_same(weights.state_dict, tiny_vae.state_dict(), torch.float16)


def test_read_vae_single_file_from_diffusers(tiny_vae: AutoencoderKL, tmp_path: Path) -> None:
    """The same bare file that diffusers' AutoencoderKL.from_single_file reads gives the same tensors."""
    path = save(vae_to_ldm(tiny_vae.state_dict(), tiny_vae.config, prefix=""), tmp_path / "vae.safetensors")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    shutil.copy(Path(tiny_vae.config["_name_or_path"]) / "config.json", config_dir / "config.json")
    reference = AutoencoderKL.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    assert_same(read_vae(path, tiny_config()).state_dict, reference.state_dict(), torch.float32)


def test_read_vae_pickle(tiny_vae: AutoencoderKL, tmp_path: Path) -> None:
    ldm = vae_to_ldm(tiny_vae.state_dict(), tiny_vae.config, prefix="")
    torch.save({"state_dict": ldm, "global_step": 840000}, tmp_path / "vae.pt")
    assert_same(read_vae(tmp_path / "vae.pt", tiny_config()).state_dict, tiny_vae.state_dict(), torch.float32)


class Opaque:
    """A class a weights-only unpickler refuses."""


def test_read_vae_refuses_code_pickle(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "callback": Opaque()}, tmp_path / "vae.ckpt")
    with pytest.raises(ModelFolderError, match=r"needs to run code to load.*convert it to \.safetensors"):
        read_vae(tmp_path / "vae.ckpt")


@pytest.mark.parametrize("name", ["vae.safetensors", "vae.ckpt"])
def test_read_vae_corrupt_file(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64))
    with pytest.raises(ModelFolderError, match=r"corrupt") as error:
        read_vae(tmp_path / name)
    assert "\n" not in str(error.value)


def test_read_vae_wrong_shapes_names_the_tensor(tmp_path: Path) -> None:
    """A VAE of SD's layout but a quarter of its width, read against the default (SD) config."""
    narrow = {
        **preset_spec("sd15").vae.config(),
        "block_out_channels": (32, 64, 128, 128),
        "norm_num_groups": 8,
    }
    zeros = {name: torch.zeros(shape) for name, shape in vae_shapes(narrow).items()}
    path = save(vae_to_ldm(zeros, narrow, prefix=""), tmp_path / "vae.safetensors")
    needs = r"'encoder\.conv_in\.weight' is \[32, 3, 3, 3\], the SD VAE config needs \[128, 3, 3, 3\]"
    with pytest.raises(ModelFolderError, match=needs):
        read_vae(path)


def test_read_vae_unused_and_missing_keys(tiny_vae: AutoencoderKL, tmp_path: Path) -> None:
    ldm = vae_to_ldm(tiny_vae.state_dict(), tiny_vae.config, prefix="")
    del ldm["decoder.conv_out.bias"]
    ldm["decoder.extra.weight"] = torch.zeros(1)
    path = save(ldm, tmp_path / "vae.safetensors")
    with pytest.raises(
        ModelFolderError,
        match=r"1 unused tensors \('decoder\.extra\.weight'\); 1 missing \('decoder\.conv_out\.bias'\)",
    ):
        read_vae(path, tiny_config())


def test_read_vae_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="VAE not found"):
        read_vae(tmp_path / "nothing.safetensors")
    (tmp_path / "vae.onnx").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="unknown weights type"):
        read_vae(tmp_path / "vae.onnx")
