"""Single-file checkpoints: detection, options, errors, and the loaded modules against diffusers'
own ``from_single_file`` on the same files (tiny / tiny-v presets, fp16 and fp32)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from engine.errors import ModelFolderError
from engine.models.checkpoint.single_file import (
    Checkpoint,
    ema_key,
    inspect_checkpoint,
    load_checkpoint,
    probe_output_shift,
)
from engine.models.source import SourceOptions
from engine.models.torch_modules import SourceModel
from tests.models.ldm import write_checkpoint

UNET = "model.diffusion_model."


# --- helpers -----------------------------------------------------------------------------------------


def config_folder(model: Path, target: Path, **scheduler: Any) -> Path:
    """A config-only copy of a diffusers folder (no weights), scheduler keys changed (None: removed)."""
    for name in ("unet", "vae", "text_encoder"):
        (target / name).mkdir(parents=True)
        shutil.copy(model / name / "config.json", target / name / "config.json")
    shutil.copytree(model / "tokenizer", target / "tokenizer")
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    config.update(scheduler)
    config = {k: v for k, v in config.items() if v is not None}
    (target / "scheduler").mkdir()
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return target


def rewrite(
    path: Path, target: Path, drop: tuple[str, ...] = (), keep: Callable[[str], bool] | None = None
) -> Path:
    tensors = load_file(path)
    tensors = {k: v for k, v in tensors.items() if k not in drop and (keep is None or keep(k))}
    save_file(tensors, target)
    return target


def write_tensors(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, path)
    return path


def one_line_error(match: str, call: Callable[[], Any]) -> str:
    with pytest.raises(ModelFolderError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def diffusers_reference(path: Path, folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32
    )


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def assert_same_tensors(ours: SourceModel, theirs: Any) -> None:
    for component in ("unet", "vae", "text_encoder"):
        mine, reference = state(getattr(ours, component)), state(getattr(theirs, component))
        assert mine.keys() == reference.keys(), component
        for name, tensor in reference.items():
            assert mine[name].dtype == torch.float32, name
            assert torch.equal(mine[name], tensor.float()), f"{component}: {name}"


def folder_tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    return load_file(folder / component / f"{stem}.safetensors")


def load(path: Path, **options: Any) -> tuple[Checkpoint, SourceModel]:
    checkpoint = inspect_checkpoint(path, SourceOptions(**options))
    return checkpoint, load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def sd1(tiny_model: Path, files: Path) -> Path:
    return write_checkpoint(tiny_model, files / "sd1.safetensors")


@pytest.fixture(scope="module")
def sd2(tiny_v_model: Path, files: Path) -> Path:
    return write_checkpoint(tiny_v_model, files / "sd2.safetensors")


# --- the same tensors as diffusers' from_single_file ----------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "suffix"),
    [(torch.float16, ".safetensors"), (torch.float32, ".ckpt")],
    ids=["fp16", "fp32-ckpt"],
)
@pytest.mark.parametrize("text_model_level", [True, False], ids=["text_model", "no-text_model"])
def test_sd1_matches_diffusers(
    tiny_model: Path, tmp_path: Path, dtype: torch.dtype, suffix: str, text_model_level: bool
) -> None:
    """diffusers only reads SD 1 files with the text_model. level: its file is the reference for both."""
    path = write_checkpoint(tiny_model, tmp_path / f"m{suffix}", dtype, text_model_prefix=text_model_level)
    reference = write_checkpoint(tiny_model, tmp_path / f"ref{suffix}", dtype)
    checkpoint, ours = load(path, config_dir=tiny_model)
    assert (checkpoint.family, checkpoint.prediction_type) == ("sd1", "epsilon")
    assert checkpoint.layout.text_prefix.endswith("text_model." if text_model_level else "transformer.")
    assert checkpoint.tokenizer_dir == tiny_model / "tokenizer"
    assert_same_tensors(ours, diffusers_reference(reference, tiny_model))


@pytest.mark.parametrize(
    ("dtype", "suffix"),
    [(torch.float16, ".safetensors"), (torch.float32, ".ckpt")],
    ids=["fp16", "fp32-ckpt"],
)
def test_sd2_v_prediction_from_yaml_matches_diffusers(
    tiny_v_model: Path, tmp_path: Path, dtype: torch.dtype, suffix: str
) -> None:
    """OpenCLIP names with the unused extra block, text_projection and logit_scale; v-prediction
    decided by the yaml beside the file, over a config folder whose scheduler says epsilon."""
    path = write_checkpoint(tiny_v_model, tmp_path / f"m{suffix}", dtype)
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    configs = config_folder(tiny_v_model, tmp_path / "configs", prediction_type="epsilon")
    checkpoint, ours = load(path, config_dir=configs)
    assert (checkpoint.family, checkpoint.prediction_type, checkpoint.prediction_source) == (
        "sd2",
        "v_prediction",
        "yaml",
    )
    assert checkpoint.configs["scheduler"]["prediction_type"] == "v_prediction"
    reference = diffusers_reference(path, tiny_v_model)
    assert reference.scheduler.config.prediction_type == "v_prediction"
    assert_same_tensors(ours, reference)


def test_loaded_modules_are_float32_eval_and_materialized(sd1: Path, tiny_model: Path) -> None:
    _, model = load(sd1, config_dir=tiny_model)
    for component in (model.unet, model.vae, model.text_encoder):
        assert not component.training
        for tensor in (*component.parameters(), *component.buffers()):
            assert not tensor.is_meta and not tensor.requires_grad
            assert tensor.dtype == torch.float32 or not tensor.is_floating_point()
    ids = model.text_encoder(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert torch.isfinite(ids).all()


# --- what the file is ----------------------------------------------------------------------------------

TEXT = "cond_stage_model.transformer.text_model.final_layer_norm.weight"


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (
            {"conditioner.embedders.0.transformer.x": (1,), f"{UNET}input_blocks.0.0.weight": (8, 4, 3, 3)},
            "unknown SDXL-style conditioner",
        ),
        (
            {f"{UNET}input_blocks.0.0.weight": (8, 9, 3, 3), TEXT: (4,)},
            "inpainting checkpoints are not supported yet",
        ),
        ({f"{UNET}input_blocks.0.0.weight": (8, 5, 3, 3), TEXT: (4,)}, "5-channel UNet input"),
        ({"lora_unet_down_blocks_0.lora_down.weight": (4, 4)}, "looks like a LoRA"),
        (
            {"encoder.conv_in.weight": (4, 3, 3, 3), "decoder.conv_out.weight": (3, 4, 3, 3)},
            "looks like a VAE alone",
        ),
        ({"control_model.input_blocks.0.0.weight": (4, 4, 3, 3)}, "ControlNet"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "one network of a diffusers model folder"),
        ({f"{UNET}input_blocks.0.0.weight": (8, 4, 3, 3)}, "a UNet without a text encoder"),
        ({"something.else": (2,)}, "not a Stable Diffusion checkpoint .*'something.else'"),
        ({}, "holds no tensors"),
    ],
    ids=[
        "sdxl",
        "inpainting",
        "depth",
        "lora",
        "vae",
        "controlnet",
        "diffusers",
        "unet-only",
        "unknown",
        "empty",
    ],
)
def test_what_is_not_an_sd1_or_sd2_checkpoint_is_named(tmp_path: Path, shapes: dict, match: str) -> None:
    path = write_tensors(tmp_path / "x.safetensors", shapes)
    one_line_error(match, lambda: inspect_checkpoint(path))


def test_a_config_that_does_not_fit_suggests_a_config_folder(sd1: Path, tiny_v_model: Path) -> None:
    message = one_line_error("needs", lambda: inspect_checkpoint(sd1))  # the sd15 preset: far larger
    assert "sd15 preset" in message and "--config" in message
    one_line_error("config folder", lambda: inspect_checkpoint(sd1, SourceOptions(config_dir=tiny_v_model)))


def test_unused_and_missing_tensors_are_errors(sd1: Path, tiny_model: Path, tmp_path: Path) -> None:
    options = SourceOptions(config_dir=tiny_model)
    extra = {f"{UNET}label_emb.0.0.weight": torch.zeros(4, 4), "lora_te_text_model.alpha": torch.zeros(())}
    path = write_checkpoint(tiny_model, tmp_path / "extra.safetensors", extra=extra)
    message = one_line_error("2 tensors fit no network", lambda: inspect_checkpoint(path, options))
    assert "label_emb" in message and "lora_te_text_model.alpha" in message
    dropped = f"{UNET}out.2.bias"
    path = rewrite(sd1, tmp_path / "missing.safetensors", drop=(dropped,))
    assert dropped in one_line_error(
        "1 tensors of the config folder tiny architecture are missing",
        lambda: inspect_checkpoint(path, options),
    )


def test_known_unused_tensors_are_allowed(tiny_model: Path, tmp_path: Path) -> None:
    extra = {"first_stage_model.loss.logvar": torch.zeros(()), "posterior_variance": torch.zeros(1000)}
    path = write_checkpoint(tiny_model, tmp_path / "x.safetensors", extra=extra)
    assert inspect_checkpoint(path, SourceOptions(config_dir=tiny_model)).family == "sd1"


def test_mixed_clip_names_are_refused(sd1: Path, tiny_model: Path, tmp_path: Path) -> None:
    tensors = load_file(sd1)
    old = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    tensors["cond_stage_model.transformer.final_layer_norm.bias"] = tensors.pop(old)
    save_file(tensors, tmp_path / "mixed.safetensors")
    one_line_error(
        "mixes names",
        lambda: inspect_checkpoint(tmp_path / "mixed.safetensors", SourceOptions(config_dir=tiny_model)),
    )


# --- EMA ------------------------------------------------------------------------------------------


def test_ema_weights_only_when_asked(tiny_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model, tmp_path / "ema.safetensors", ema=True)
    assert sum(k.startswith("model_ema.") for k in load_file(path)) > 100
    expected = folder_tensors(tiny_model, "unet")
    for ema, factor in ((False, 1), (True, 2)):
        checkpoint, model = load(path, config_dir=tiny_model, ema=ema)
        assert checkpoint.ema is ema
        unet = model.unet.state_dict()
        for name, tensor in expected.items():
            assert torch.equal(unet[name], (tensor * factor).half().float()), name


def test_ema_on_a_file_without_ema_is_an_error(sd1: Path, tiny_model: Path) -> None:
    one_line_error(
        "has none", lambda: inspect_checkpoint(sd1, SourceOptions(config_dir=tiny_model, ema=True))
    )


def test_ema_only_file_needs_the_option(tiny_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model, tmp_path / "ema.safetensors", ema=True)
    path = rewrite(path, tmp_path / "ema-only.safetensors", keep=lambda k: not k.startswith(UNET))
    one_line_error("pass --ema", lambda: inspect_checkpoint(path, SourceOptions(config_dir=tiny_model)))
    _, model = load(path, config_dir=tiny_model, ema=True)
    assert torch.equal(
        model.unet.conv_in.bias, (folder_tensors(tiny_model, "unet")["conv_in.bias"] * 2).half().float()
    )


def test_ema_names_drop_the_dots() -> None:
    assert ema_key(f"{UNET}input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


# --- VAE --------------------------------------------------------------------------------------------


def test_no_baked_vae_asks_for_one(tiny_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model, tmp_path / "novae.safetensors", baked_vae=False)
    one_line_error("no VAE .*--vae", lambda: inspect_checkpoint(path, SourceOptions(config_dir=tiny_model)))
    checkpoint, model = load(path, config_dir=tiny_model, vae=tiny_model / "vae")
    assert checkpoint.vae_source == tiny_model / "vae"
    for name, tensor in folder_tensors(tiny_model, "vae").items():
        assert torch.equal(model.vae.state_dict()[name], tensor), name


def test_a_given_vae_replaces_the_baked_one(sd1: Path, tiny_model: Path, tiny_v_model: Path) -> None:
    """tiny-v's VAE has tiny's architecture and other weights."""
    checkpoint, model = load(sd1, config_dir=tiny_model, vae=tiny_v_model / "vae")
    assert any("replaces the baked VAE" in note for note in checkpoint.notes)
    for name, tensor in folder_tensors(tiny_v_model, "vae").items():
        assert torch.equal(model.vae.state_dict()[name], tensor), name


def test_vae_attention_in_diffusers_spelling_loads_alike(sd1: Path, tiny_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(
        tiny_model, tmp_path / "diffusers-attention.safetensors", vae_attention="diffusers"
    )
    assert "first_stage_model.decoder.mid.attn_1.to_q.weight" in load_file(path)
    _, ours = load(path, config_dir=tiny_model)
    _, reference = load(sd1, config_dir=tiny_model)
    for name, tensor in reference.vae.state_dict().items():
        assert torch.equal(ours.vae.state_dict()[name], tensor), name


# --- prediction type ---------------------------------------------------------------------------------


def prediction(path: Path, **options: Any) -> tuple[str, str, dict]:
    checkpoint = inspect_checkpoint(path, SourceOptions(**options))
    return checkpoint.prediction_type, checkpoint.prediction_source, checkpoint.configs["scheduler"]


def test_marker_keys_select_v_prediction_and_zero_snr(tiny_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model, tmp_path / "v.safetensors", markers=("v_pred",))
    assert prediction(path, config_dir=tiny_model)[:2] == ("v_prediction", "marker v_pred")
    path = write_checkpoint(tiny_model, tmp_path / "z.safetensors", markers=("v_pred", "ztsnr"))
    kind, _, scheduler = prediction(path, config_dir=tiny_model)
    assert kind == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"


def test_the_option_always_wins(tiny_model: Path, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_model, tmp_path / "v.safetensors", markers=("v_pred",))
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert prediction(path, config_dir=tiny_model, prediction_type="epsilon")[:2] == ("epsilon", "option")
    path = write_checkpoint(tiny_model, tmp_path / "z.safetensors", markers=("ztsnr",))
    one_line_error(
        "needs v_prediction",
        lambda: inspect_checkpoint(path, SourceOptions(config_dir=tiny_model, prediction_type="epsilon")),
    )


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ('model:\n  params:\n    parameterization: "v"\n', "v_prediction"),
        ("model:\n  params:\n    parameterization: eps\n", "epsilon"),
        (
            "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    timesteps: 1000\n",
            "epsilon",
        ),
    ],
    ids=["v", "eps", "ldm-default"],
)
def test_yaml_beside_the_file(
    sd2: Path, tiny_v_model: Path, tmp_path: Path, yaml: str, expected: str
) -> None:
    path = Path(shutil.copy(sd2, tmp_path / "m.safetensors"))
    path.with_suffix(".yaml").write_text(yaml)
    assert prediction(path, config_dir=tiny_v_model)[:2] == (expected, "yaml")


@pytest.mark.parametrize(
    ("yaml", "match"),
    [
        ("model:\n  params:\n    parameterization: x0\n", "not supported"),
        ("just: text\n", "not an LDM model config"),
        ("model: [unclosed\n", "cannot read"),
    ],
    ids=["x0", "not-ldm", "broken"],
)
def test_bad_yaml_is_one_line(sd1: Path, tiny_model: Path, tmp_path: Path, yaml: str, match: str) -> None:
    path = Path(shutil.copy(sd1, tmp_path / "m.safetensors"))
    path.with_suffix(".yaml").write_text(yaml)
    one_line_error(match, lambda: inspect_checkpoint(path, SourceOptions(config_dir=tiny_model)))


def test_config_folder_then_default(sd1: Path, tiny_model: Path, tmp_path: Path) -> None:
    assert prediction(sd1, config_dir=tiny_model)[:2] == ("epsilon", "config_dir")
    v_configs = config_folder(tiny_model, tmp_path / "v", prediction_type="v_prediction")
    assert prediction(sd1, config_dir=v_configs)[:2] == ("v_prediction", "config_dir")
    unstated = config_folder(tiny_model, tmp_path / "unstated", prediction_type=None)
    assert prediction(sd1, config_dir=unstated)[:2] == ("epsilon", "default")


@pytest.mark.parametrize(("bias", "expected"), [(0.5, "epsilon"), (-1.0, "v_prediction")])
def test_sd2_probe_decides_when_nothing_else_does(
    tiny_v_model: Path, tmp_path: Path, bias: float, expected: str
) -> None:
    """A UNet whose output is the constant ``bias`` (conv_out zeroed): shift = bias - 0.5."""
    out = {f"{UNET}out.2.weight": torch.zeros(4, 32, 3, 3), f"{UNET}out.2.bias": torch.full((4,), bias)}
    path = write_checkpoint(tiny_v_model, tmp_path / "m.safetensors", extra=out)
    unstated = config_folder(tiny_v_model, tmp_path / "configs", prediction_type=None)
    kind, source, _ = prediction(path, config_dir=unstated)
    assert (kind, source) == (expected, "probe")
    unet = load(path, config_dir=unstated)[1].unet
    assert probe_output_shift(unet) == pytest.approx(bias - 0.5, abs=1e-6)


# --- reading files ---------------------------------------------------------------------------------


def test_nested_state_dicts_are_unwrapped(sd1: Path, tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": load_file(sd1)}, "epoch": 3}, path)
    assert inspect_checkpoint(path, SourceOptions(config_dir=tiny_model)).family == "sd1"


def test_a_pickle_that_needs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "callback": SourceOptions()}, path)
    one_line_error("needs to run code .*convert it to .safetensors", lambda: inspect_checkpoint(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_or_corrupt_files_are_one_line(sd1: Path, tmp_path: Path, suffix: str) -> None:
    data = sd1.read_bytes() if suffix == ".safetensors" else _ckpt_bytes(sd1, tmp_path)
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    one_line_error("truncated|corrupt", lambda: inspect_checkpoint(truncated))
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x01\x02 not a checkpoint" * 10)
    one_line_error("corrupt", lambda: inspect_checkpoint(garbage))


def _ckpt_bytes(sd1: Path, tmp_path: Path) -> bytes:
    path = tmp_path / "whole.ckpt"
    torch.save({"state_dict": load_file(sd1)}, path)
    return path.read_bytes()


def test_bad_paths_and_options_are_one_line(sd1: Path, tmp_path: Path) -> None:
    one_line_error("checkpoint not found", lambda: inspect_checkpoint(tmp_path / "nope.safetensors"))
    other = Path(shutil.copy(sd1, tmp_path / "m.gguf"))
    one_line_error("unknown weights type", lambda: inspect_checkpoint(other))
    one_line_error("unknown prediction type", lambda: SourceOptions(prediction_type="sample"))
    one_line_error(
        "--config .* not found: give a diffusers model folder",
        lambda: inspect_checkpoint(sd1, SourceOptions(config_dir=tmp_path / "no")),
    )
    one_line_error(
        "--config .* is not a folder: give a diffusers model folder",
        lambda: inspect_checkpoint(sd1, SourceOptions(config_dir=sd1)),
    )
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 64)
    one_line_error("not a safetensors file, or a corrupt one", lambda: inspect_checkpoint(noise))
    one_line_error(
        "VAE not found", lambda: inspect_checkpoint(sd1, SourceOptions(vae=tmp_path / "no.safetensors"))
    )


# --- memory at SD size ------------------------------------------------------------------------------

_PEAK_SCRIPT = """
import json, resource, sys
from engine.models.checkpoint.single_file import inspect_checkpoint, load_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_checkpoint(inspect_checkpoint(sys.argv[1]))
weights = sum(t.numel() * t.element_size() for m in (model.unet, model.vae, model.text_encoder)
              for t in m.state_dict().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "weights": weights}))
"""


@pytest.mark.slow
def test_sd15_sized_fp16_file_loads_near_one_float32_copy(tmp_path: Path) -> None:
    """A 2.1 GB fp16 .safetensors (sd15 preset, random weights): the load's peak RSS stays within 15%
    of the float32 weights (measured: 4.59 GB over the interpreter's for 4.26 GB of weights)."""
    import subprocess
    import sys

    from engine.models.presets import init_random

    folder = init_random("sd15", tmp_path / "sd15")
    path = write_checkpoint(folder, tmp_path / "sd15.safetensors")
    shutil.rmtree(folder)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["weights"] > 4e9
    assert measured["peak"] - measured["before"] < 1.15 * measured["weights"], measured
