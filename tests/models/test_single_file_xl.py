"""SDXL single-file checkpoints (``conditioner.embedders.*``, generative-models layout): the tiny-xl
model written as one file and read back by our import and by diffusers' ``from_single_file``; errors;
and the built-in ``sdxl`` configs against SDXL base's key list, on a sparse file (header only)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from engine.errors import ModelFolderError
from engine.models.checkpoint.keymap import invert_rules
from engine.models.checkpoint.single_file import (
    CheckpointLayout,
    component_rules,
    ema_key,
    inspect_checkpoint,
    load_checkpoint,
    preset_configs,
)
from engine.models.checkpoint.text import XL_CLIP_PREFIX, XL_OPENCLIP_PREFIX
from engine.models.checkpoint.vae import VaeAttention
from engine.models.source import SourceOptions, open_model_source
from engine.models.torch_modules import meta_module
from engine.text.tokenizer import ClipTokenizer
from tests.models.ldm import write_checkpoint

UNET = "model.diffusion_model."
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def one_line_error(match: str, call: Callable[[], Any]) -> str:
    with pytest.raises(ModelFolderError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def canonical(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoder names without transformers' optional ``text_model.`` level."""
    return {k.removeprefix("text_model."): v for k, v in tensors.items()}


def config_folder(model: Path, target: Path, **changes: dict[str, Any]) -> Path:
    """A config-only copy of a diffusers folder (configs and tokenizers, no weights); ``changes``:
    component -> config keys to overwrite."""
    for name in (*NETWORKS, "scheduler"):
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        config = {**json.loads((model / name / file).read_text()), **changes.get(name, {})}
        (target / name).mkdir(parents=True)
        (target / name / file).write_text(json.dumps(config))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(model / name, target / name)
    return target


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models.presets import init_random

    return init_random("tiny-xl", tmp_path_factory.mktemp("models") / "tiny-xl", seed=5)


@pytest.fixture(scope="module")
def xl_file(xl_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32, so its weights are the folder's exactly."""
    return write_checkpoint(xl_model, tmp_path_factory.mktemp("xl") / "xl.safetensors", torch.float32)


# --- the tiny-xl model through one file -------------------------------------------------------------


def test_our_import_and_diffusers_give_the_folders_weights(xl_model: Path, xl_file: Path) -> None:
    """All four networks bit-equal to the folder's, and to what diffusers' own from_single_file reads
    from the same file (which validates the test writer's layout as the real one)."""
    checkpoint = inspect_checkpoint(xl_file, SourceOptions(config_dir=xl_model))
    assert (checkpoint.family, checkpoint.prediction_type) == ("sdxl", "epsilon")
    assert (checkpoint.tokenizer_dir, checkpoint.tokenizer_2_dir) == (
        xl_model / "tokenizer",
        xl_model / "tokenizer_2",
    )
    assert checkpoint.layout.text_2_prefix == XL_OPENCLIP_PREFIX
    ours = load_checkpoint(checkpoint)
    assert type(ours.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    reference = StableDiffusionXLPipeline.from_single_file(
        str(xl_file), config=str(xl_model), local_files_only=True, torch_dtype=torch.float32
    )
    for network in NETWORKS:
        module = getattr(ours, network)
        assert not module.training
        mine = canonical(module.state_dict())
        folder = canonical(load_file(xl_model / network / f"{WEIGHTS.get(network, 'model')}.safetensors"))
        theirs = canonical(getattr(reference, network).state_dict())
        expected = {k: v for k, v in folder.items() if not k.endswith("position_ids")}
        assert {k for k in mine if not k.endswith("position_ids")} == expected.keys(), network
        for name, tensor in expected.items():
            assert mine[name].dtype == torch.float32, name
            assert torch.equal(mine[name], tensor), f"{network}: {name}"
            assert torch.equal(mine[name], theirs[name].float()), f"{network}: {name} (diffusers)"


def test_open_model_source_and_both_tokenizers(xl_model: Path, xl_file: Path, tmp_path: Path) -> None:
    source = open_model_source(xl_file, SourceOptions(config_dir=xl_model))
    assert source.family == "sdxl" and source.prediction_type == "epsilon"
    assert set(source.configs) >= {*NETWORKS, "scheduler"}
    assert source.configs["text_encoder_2"]["projection_dim"] == 40
    assert source.configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert source.tokenizers == ("tokenizer", "tokenizer_2")
    pads = {}
    for name in source.tokenizers:
        source.write_tokenizer(tmp_path / name, name)
        tokenizer = ClipTokenizer.from_folder(tmp_path / name)
        vocab = json.loads((xl_model / name / "vocab.json").read_text())
        pads[name] = next(token for token, index in vocab.items() if index == tokenizer.pad_id)
    assert pads == {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def test_a_config_folder_without_tokenizer_2_falls_back_to_the_bundled_bpe(
    xl_model: Path, xl_file: Path, tmp_path: Path
) -> None:
    """The bundled CLIP BPE for the missing one, padded with "!" as SDXL's second tokenizer is."""
    configs = config_folder(xl_model, tmp_path / "configs")
    shutil.rmtree(configs / "tokenizer_2")
    source = open_model_source(xl_file, SourceOptions(config_dir=configs))
    assert (source.checkpoint.tokenizer_dir, source.checkpoint.tokenizer_2_dir) == (
        configs / "tokenizer",
        None,
    )
    source.write_tokenizer(tmp_path / "tokenizer_2", "tokenizer_2")
    tokenizer = ClipTokenizer.from_folder(tmp_path / "tokenizer_2")
    assert tokenizer.vocab_size == 49408
    assert [tokenizer.pad_id] == tokenizer.encode_unpadded("!")


def test_ema_and_v_prediction_markers(xl_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(
        xl_model, tmp_path / "ema.safetensors", torch.float32, ema=True, markers=("v_pred",)
    )
    checkpoint = inspect_checkpoint(path, SourceOptions(config_dir=xl_model, ema=True))
    assert (checkpoint.prediction_type, checkpoint.prediction_source) == ("v_prediction", "marker v_pred")
    unet = load_checkpoint(checkpoint).unet.state_dict()
    folder = load_file(xl_model / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet[name], 2 * tensor) for name, tensor in folder.items())


# --- what is refused --------------------------------------------------------------------------------


def _rewrite(source: Path, target: Path, rename: Callable[[str], str | None]) -> Path:
    tensors = {rename(k): v for k, v in load_file(source).items()}
    save_file({k: v for k, v in tensors.items() if k is not None}, target)
    return target


def test_refiner_and_other_conditioners_are_refused(xl_file: Path, tmp_path: Path) -> None:
    def refiner(key: str) -> str | None:
        if key.startswith(XL_CLIP_PREFIX):
            return None
        return key.replace(XL_OPENCLIP_PREFIX, "conditioner.embedders.0.model.")

    path = _rewrite(xl_file, tmp_path / "refiner.safetensors", refiner)
    one_line_error("SDXL refiner checkpoints are not supported", lambda: inspect_checkpoint(path))
    path = _rewrite(xl_file, tmp_path / "one.safetensors", lambda k: None if "embedders.1" in k else k)
    message = one_line_error("unknown SDXL-style conditioner", lambda: inspect_checkpoint(path))
    assert "'conditioner.embedders.0.transformer'" in message


def test_truncated_or_corrupt_files_are_one_line(xl_file: Path, tmp_path: Path) -> None:
    data = xl_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    one_line_error("truncated", lambda: inspect_checkpoint(truncated))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"{not json" + data[17:])
    one_line_error("corrupt", lambda: inspect_checkpoint(corrupt))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"text_encoder_2": {"projection_dim": 48}}, f"{XL_OPENCLIP_PREFIX}text_projection"),
        ({"unet": {"projection_class_embeddings_input_dim": 90}}, f"{UNET}label_emb.0.0.weight"),
    ],
    ids=["projection", "text-time"],
)
def test_a_shape_mismatch_names_the_key(
    xl_model: Path, xl_file: Path, tmp_path: Path, changes: dict, key: str
) -> None:
    configs = config_folder(xl_model, tmp_path / "configs", **changes)
    message = one_line_error("needs", lambda: inspect_checkpoint(xl_file, SourceOptions(config_dir=configs)))
    assert f"'{key}'" in message and "config folder configs" in message


def test_missing_tensors_and_non_xl_config_folders(
    xl_model: Path, xl_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    dropped = f"{UNET}label_emb.0.2.bias"
    path = _rewrite(xl_file, tmp_path / "missing.safetensors", lambda k: None if k == dropped else k)
    configs = SourceOptions(config_dir=xl_model)
    assert dropped in one_line_error("1 tensors .* are missing", lambda: inspect_checkpoint(path, configs))
    one_line_error(
        "no text_encoder_2/config.json; an SDXL checkpoint needs an SDXL diffusers folder",
        lambda: inspect_checkpoint(xl_file, SourceOptions(config_dir=tiny_model)),
    )


# --- the built-in sdxl configs against SDXL base's key list (no 7 GB file) ---------------------------

# sd_xl_base_1.0.safetensors: tensors per network, and a few shapes as the released file has them.
SDXL_BASE_COUNTS = {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 389}
SDXL_BASE_SHAPES = {
    f"{UNET}input_blocks.0.0.weight": (320, 4, 3, 3),
    f"{UNET}time_embed.0.weight": (1280, 320),
    f"{UNET}label_emb.0.0.weight": (1280, 2816),
    f"{UNET}label_emb.0.2.weight": (1280, 1280),
    f"{UNET}input_blocks.4.1.proj_in.weight": (640, 640),
    f"{UNET}input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    f"{UNET}middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    f"{UNET}output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    f"{UNET}output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    f"{UNET}output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    f"{UNET}out.2.weight": (4, 320, 3, 3),
    f"{XL_CLIP_PREFIX}text_model.embeddings.token_embedding.weight": (49408, 768),
    f"{XL_CLIP_PREFIX}text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    f"{XL_OPENCLIP_PREFIX}token_embedding.weight": (49408, 1280),
    f"{XL_OPENCLIP_PREFIX}positional_embedding": (77, 1280),
    f"{XL_OPENCLIP_PREFIX}transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    f"{XL_OPENCLIP_PREFIX}transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    f"{XL_OPENCLIP_PREFIX}text_projection": (1280, 1280),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
}
# Never-run tensors the released file also holds: 2515 tensors in all.
SDXL_BASE_EXTRAS = {
    f"{XL_CLIP_PREFIX}text_model.embeddings.position_ids": (1, 77),
    f"{XL_OPENCLIP_PREFIX}logit_scale": (),
}


def sdxl_shapes(unet: Mapping[str, Any] | None = None, ema: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of an SDXL base file, from the sdxl preset's configs (``unet``: another
    UNet config; ``ema``: the UNet as its EMA copy only) through our key map inverted on meta-device
    networks."""
    configs = preset_configs("sdxl")
    if unet is not None:
        configs["unet"] = dict(unet)
    layout = CheckpointLayout(
        text_prefix=f"{XL_CLIP_PREFIX}text_model.",
        openclip=False,
        baked_vae=True,
        vae_attention=VaeAttention.LDM,
        text_2_prefix=XL_OPENCLIP_PREFIX,
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for network, rules in component_rules(configs, layout, ema).items():
        state = meta_module(network, configs[network]).state_dict()
        shapes.update({k: tuple(v.shape) for k, v in invert_rules(state, rules).items()})
    return {**shapes, **SDXL_BASE_EXTRAS}


def write_sparse_safetensors(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    """A valid fp16 safetensors file of these shapes whose data is a hole: the header alone is written,
    then the file is extended to full size (a sparse file, no disk blocks). Enough for
    inspect_checkpoint, which reads headers only."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def test_builtin_sdxl_configs_fit_sdxl_base_keys(xl_file: Path, tmp_path: Path) -> None:
    """Our key map on the sdxl preset's networks gives SDXL base's names, counts and shapes, and a file
    with them passes the built-in shape check; a file of another size (tiny-xl) is refused naming a
    tensor, with the hint to describe it by a config folder."""
    shapes = sdxl_shapes()
    for key, shape in SDXL_BASE_SHAPES.items():
        assert shapes[key] == shape, key
    counted = {
        "unet": sum(k.startswith(UNET) for k in shapes),
        "vae": sum(k.startswith("first_stage_model.") for k in shapes),
        "text_encoder": sum(k.startswith(XL_CLIP_PREFIX) for k in shapes) - 1,
        "text_encoder_2": sum(k.startswith(XL_OPENCLIP_PREFIX) for k in shapes) - 1,
    }
    assert counted == SDXL_BASE_COUNTS and len(shapes) == 2515
    path = write_sparse_safetensors(tmp_path / "sd_xl_base.safetensors", shapes)
    checkpoint = inspect_checkpoint(path)
    assert (checkpoint.family, checkpoint.prediction_type) == ("sdxl", "epsilon")
    assert "architecture from the sdxl preset" in checkpoint.notes[0]
    assert checkpoint.configs["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert checkpoint.configs["text_encoder_2"]["num_hidden_layers"] == 32
    assert checkpoint.configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert (checkpoint.tokenizer_dir, checkpoint.tokenizer_2_dir) == (None, None)
    message = one_line_error("needs", lambda: inspect_checkpoint(xl_file))
    assert (
        f"'{UNET}input_blocks.0.0.weight' is [32, 4, 3, 3] but the sdxl preset unet needs [320, 4, 3, 3]"
        in message
    )
    assert "--config" in message


def test_builtin_sdxl_reads_transformer_depths_from_the_file(tmp_path: Path) -> None:
    """SDXL-shaped files with other depths (distilled models) need no config folder: here per-layer
    depths (diffusers' nested form) in an EMA-only file, read by its EMA names."""
    from engine.models.presets import preset_spec

    depths = {
        "transformer_layers_per_block": [[1, 1], [2, 2], [4, 3]],
        "reverse_transformer_layers_per_block": [[3, 4, 2], [2, 1, 2], [1, 1, 1]],
    }
    shapes = sdxl_shapes({**preset_spec("sdxl").unet.config(), **depths}, ema=True)
    assert ema_key(f"{UNET}out.2.weight") in shapes and f"{UNET}out.2.weight" not in shapes
    path = write_sparse_safetensors(tmp_path / "distilled.safetensors", shapes)
    checkpoint = inspect_checkpoint(path, SourceOptions(ema=True))
    config = checkpoint.configs["unet"]
    assert {k: config.get(k) for k in depths} == depths
    assert checkpoint.notes[-1].startswith(
        "transformer depths read from the file: transformer_layers_per_block="
    )


@pytest.mark.parametrize(
    "depths",
    [
        {"transformer_layers_per_block": [1, 3, 2]},
        {
            "transformer_layers_per_block": [[1], [2], [3]],
            "reverse_transformer_layers_per_block": [[3, 2], [2, 1], [1, 1]],
        },
        {
            "transformer_layers_per_block": [1, 1, 2],
            "reverse_transformer_layers_per_block": [[2, 2], [2, 2], [1, 1]],
        },
    ],
    ids=["per-level", "per-layer", "asymmetric-up"],
)
def test_depths_from_keys_rebuild_the_config(depths: dict) -> None:
    """The depths read back from a key list give a config whose rules cover the diffusers model."""
    from engine.models.checkpoint.unet import depths_from_keys, unet_rules
    from engine.models.presets import preset_spec

    config = preset_spec("tiny-xl").unet.config()
    names = {rule.ldm for rule in unet_rules({**config, **depths})}
    found = depths_from_keys(names, config)
    rebuilt = {**config, **found}
    model = meta_module("unet", rebuilt).state_dict()
    assert {name for rule in unet_rules(rebuilt) for name in rule.diffusers} == set(model)
    assert {rule.ldm for rule in unet_rules(rebuilt)} == names
    assert depths_from_keys(names - {f"{UNET}middle_block.1.transformer_blocks.0.norm1.weight"}, config) == {}
