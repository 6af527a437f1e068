"""TensorRT build without TensorRT: profiles from the specs, cache keys, sidecars, every error path.

Nothing here needs a GPU or tensorrt; the tests that build real plans live in test_gpu.py and skip
where tensorrt or CUDA are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.build_trt import (
    BuildSettings,
    ProfileKind,
    Rebuild,
    ShapeProfile,
    make_profiles,
)
from engine.commands import build as build_command
from engine.commands.build import add_command
from engine.errors import (
    BuildError,
    BuildOutOfMemoryError,
    EngineError,
    EngineFolderError,
    MissingDependencyError,
)
from engine.manifest import GraphEntry, Manifest, write_manifest
from engine.specs import ModelDims, Network, Precision, check_inputs, graph_specs
from engine.tensorrt import env as trt_env
from engine.tensorrt.builder import GIB, build_failure, parity_points, plan_targets
from engine.tensorrt.plans import (
    INDEX_NAME,
    PLAN_DIR,
    GpuInfo,
    PlanKey,
    PlanTarget,
    key_mismatch,
    merge_index,
    needs_build,
    plan_index,
    plan_key,
    plan_problem,
    read_plan_index,
    read_sidecar,
    sidecar_path,
    write_atomic,
    write_sidecar,
)
from engine.tensorrt.profiles import network_batch, profile_shapes

SD15 = ModelDims()  # 4 latent channels, 768 hidden, 77 tokens, VAE factor 8
SPECS = graph_specs(SD15)
SD21_UNET = graph_specs(dataclasses.replace(SD15, text_hidden_size=1024))[Network.UNET]
GPU = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# -- profiles ----------------------------------------------------------------------------------


def test_static_profile_shapes_follow_the_specs() -> None:
    profile = ShapeProfile.static(1, 512, 768)
    assert profile.is_static and profile.label == "b1-768x512"
    unet = profile_shapes(SPECS[Network.UNET], profile, SD15)
    assert unet == {  # guidance off (the images) up to guidance with rescale (2 x images)
        "sample": ((1, 4, 64, 96), (2, 4, 64, 96), (2, 4, 64, 96)),
        "timestep": ((1,), (2,), (2,)),
        "encoder_hidden_states": ((1, 77, 768), (2, 77, 768), (2, 77, 768)),
    }
    fused = profile_shapes(SPECS[Network.UNET_CFG], profile, SD15)
    assert fused == {
        "sample": ((1, 4, 64, 96),) * 3,
        "timestep": ((1,),) * 3,
        "encoder_hidden_states": ((2, 77, 768),) * 3,
    }
    assert profile_shapes(SPECS[Network.VAE_DECODER], profile, SD15) == {"latent": ((1, 4, 64, 96),) * 3}
    assert profile_shapes(SPECS[Network.VAE_ENCODER], profile, SD15) == {"image": ((1, 3, 512, 768),) * 3}
    assert profile_shapes(SPECS[Network.TEXT_ENCODER], profile, SD15) == {"input_ids": ((1, 77),) * 3}


def test_dynamic_profile_shapes() -> None:
    (profile,) = make_profiles(ProfileKind.DYNAMIC, [2, 1, 4], [(512, 512), (256, 384), (1024, 768)], 154)
    assert profile.batch == (1, 2, 4)
    assert profile.width == (256, 512, 1024) and profile.height == (384, 512, 768)
    assert profile.sequence == (77, 77, 154) and not profile.is_static
    unet = profile_shapes(SPECS[Network.UNET], profile, SD15)
    assert unet["sample"] == ((1, 4, 48, 32), (4, 4, 64, 64), (8, 4, 96, 128))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (4, 77, 768), (8, 154, 768))
    text = profile_shapes(SPECS[Network.TEXT_ENCODER], profile, SD15)
    assert text["input_ids"] == ((1, 77), (2, 77), (4, 77))
    assert profile.label == "b1..4-256x384..1024x768-t77..154"


def test_dynamic_profile_explicit_range_keeps_opt_inside() -> None:
    (profile,) = make_profiles(
        ProfileKind.DYNAMIC, [1], [(512, 512)], min_size=(256, 256), max_size=(384, 384)
    )
    assert profile.width == (256, 512, 512) and profile.height == (256, 512, 512)


@pytest.mark.parametrize("network", SD15.networks)
@pytest.mark.parametrize("kind", list(ProfileKind))
def test_profile_shapes_satisfy_the_spec(network: Network, kind: ProfileKind) -> None:
    """min, opt and max inputs pass the runtime's own spec check: shared symbols agree everywhere."""
    spec = SPECS[network]
    for profile in make_profiles(kind, [1, 3], [(512, 512), (640, 384)], 154):
        shapes = profile_shapes(spec, profile, SD15)
        assert set(shapes) == {t.name for t in spec.inputs if t.symbols()}
        for i in range(3):
            feeds = {
                t.name: np.zeros(shapes.get(t.name, (t.dims,) * 3)[i], dtype=t.dtype) for t in spec.inputs
            }
            check_inputs(spec, feeds)


def test_static_profiles_cover_every_batch_and_size() -> None:
    profiles = make_profiles(ProfileKind.STATIC, [1, 2], [(512, 512), (768, 512), (512, 512)])
    assert [p.label for p in profiles] == ["b1-512x512", "b1-768x512", "b2-512x512", "b2-768x512"]
    assert all(p.is_static for p in profiles)


def test_unet_batch_is_twice_the_images() -> None:
    # the plain UNet covers guidance off (the images) up to guidance with rescale (twice them)
    assert network_batch(Network.UNET, ShapeProfile.static(3, 64, 64)) == (3, 6, 6)
    dynamic = ShapeProfile((1, 2, 4), (64,) * 3, (64,) * 3)
    assert network_batch(Network.UNET, dynamic) == (1, 4, 8)  # down to guidance off
    assert network_batch(Network.TEXT_ENCODER, dynamic) == (1, 2, 4)
    assert network_batch(Network.VAE_DECODER, dynamic) == (1, 2, 4)
    assert network_batch(Network.UNET_CFG, dynamic) == (1, 2, 4)  # its embeddings: twice that


def test_fused_guidance_profile_doubles_only_the_embeddings() -> None:
    profile = ShapeProfile.static(3, 512, 768)
    shapes = profile_shapes(SPECS[Network.UNET_CFG], profile, SD15)
    assert shapes["sample"] == ((3, 4, 64, 96),) * 3
    assert shapes["timestep"] == ((3,),) * 3
    assert shapes["encoder_hidden_states"] == ((6, 77, 768),) * 3
    assert "guidance_scale" not in shapes  # fixed (1,): nothing for a profile to range over


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"height": (512, 500, 512)}, "min <= opt <= max"),
        ({"width": (500, 500, 500)}, "multiple of 8"),
        ({"batch": (0, 1, 1)}, "0 < min"),
        ({"batch": (2, 1, 4)}, "min <= opt <= max"),
    ],
)
def test_bad_profiles_are_refused(fields: dict, needle: str) -> None:
    base = {"batch": (1, 1, 1), "height": (512,) * 3, "width": (512,) * 3}
    with pytest.raises(BuildError, match=needle):
        ShapeProfile(**{**base, **fields})


def test_profile_against_model_dims() -> None:
    with pytest.raises(BuildError, match="multiples of 77"):
        profile_shapes(SPECS[Network.UNET], ShapeProfile.static(1, 512, 512, sequence=100), SD15)
    coarse = dataclasses.replace(SD15, vae_scale_factor=16)
    with pytest.raises(BuildError, match="VAE scale factor 16"):
        profile_shapes(SPECS[Network.UNET], ShapeProfile.static(1, 520, 512), coarse)


def test_parity_points() -> None:
    static = ShapeProfile.static(1, 512, 512)
    dynamic = ShapeProfile((1, 1, 2), (256, 512, 512), (256, 512, 512))
    points = parity_points(SPECS[Network.UNET], [static, dynamic], SD15)
    assert [(i, s["batch"], s["latent_height"]) for i, s in points] == [
        (0, 2, 64),  # opt: guidance on
        (0, 1, 64),  # min: guidance off
        (1, 2, 64),
        (1, 1, 32),
    ]
    fused = parity_points(SPECS[Network.UNET_CFG], [static], SD15)
    assert [(i, s["batch"], s["context_batch"]) for i, s in fused] == [(0, 1, 2)]


# -- cache keys and sidecars -------------------------------------------------------------------


def _key(**changes: object) -> PlanKey:
    target = PlanTarget(Network.UNET, Precision.FP16)
    key = plan_key(
        target, SPECS[Network.UNET], "ab" * 32, (ShapeProfile.static(1, 512, 512),), SD15,
        BuildSettings(), "10.7.0", GPU,
    )  # fmt: skip
    return dataclasses.replace(key, **changes)


KEY_CHANGES = {
    "network": "text_encoder",
    "onnx_sha256": "cd" * 32,
    "precision": "fp32",
    "strongly_typed": True,
    "refit": True,
    "workspace_bytes": 4 * GIB,
    "optimization_level": 5,
    "tensorrt": "10.8.0",
    "gpu": "NVIDIA A100-SXM4-80GB",
    "compute_capability": "8.0",
    "key_version": 99,
}


def test_key_fields_are_all_covered() -> None:
    assert set(KEY_CHANGES) | {"profiles"} == {f.name for f in dataclasses.fields(PlanKey)}


@pytest.mark.parametrize("field", sorted(KEY_CHANGES))
def test_changing_any_key_field_changes_the_digest(field: str) -> None:
    assert _key(**{field: KEY_CHANGES[field]}).digest() != _key().digest()
    assert key_mismatch(_key().to_json(), _key(**{field: KEY_CHANGES[field]}).to_json())


def test_key_inputs_reach_the_digest() -> None:
    """plan_key itself: another profile, build setting or GPU gives another key."""
    target = PlanTarget(Network.UNET, Precision.FP16)
    spec, sha, profiles = SPECS[Network.UNET], "ab" * 32, (ShapeProfile.static(1, 512, 512),)
    base = plan_key(target, spec, sha, profiles, SD15, BuildSettings(), "10.7.0", GPU).digest()
    variants = [
        plan_key(target, spec, sha, (ShapeProfile.static(2, 512, 512),), SD15, BuildSettings(), "10.7.0",
                 GPU),
        plan_key(target, spec, sha, (*profiles, ShapeProfile.static(1, 768, 768)), SD15, BuildSettings(),
                 "10.7.0", GPU),
        plan_key(target, spec, sha, profiles, SD15, BuildSettings(refit=True), "10.7.0", GPU),
        plan_key(target, spec, sha, profiles, SD15, BuildSettings(workspace_bytes=GIB), "10.7.0", GPU),
        plan_key(target, spec, sha, profiles, SD15, BuildSettings(), "10.7.0", GpuInfo(GPU.name, "8.9")),
        plan_key(PlanTarget(Network.UNET, Precision.FP32), spec, sha, profiles, SD15, BuildSettings(),
                 "10.7.0", GPU),
        plan_key(target, SD21_UNET, sha, profiles, SD15, BuildSettings(), "10.7.0", GPU),
    ]  # fmt: skip
    digests = [v.digest() for v in variants]
    assert base not in digests and len(set(digests)) == len(digests)
    # The profile settings that do not change any shape do not change the key.
    same = plan_key(target, spec, sha, profiles, SD15, BuildSettings(rebuild=Rebuild.ALWAYS), "10.7.0", GPU)
    assert same.digest() == base


@pytest.fixture()
def cached_plan(tmp_path: Path) -> tuple[Path, PlanKey]:
    plan = tmp_path / "unet-fp16.plan"
    data = bytes(range(256)) * 64  # opaque bytes: the cache never looks inside a plan
    key = _key()
    write_atomic(plan, data)
    write_sidecar(plan, key, data, {"parity": {"passed": True, "worst_rel_l2": 1e-3}})
    return plan, key


def test_valid_sidecar_reuses_the_plan(cached_plan: tuple[Path, PlanKey]) -> None:
    plan, key = cached_plan
    assert plan_problem(plan, key) is None
    assert needs_build(plan, key, Rebuild.NEVER) is None
    assert needs_build(plan, key, Rebuild.ALWAYS) == "--force was given"
    sidecar = read_sidecar(plan)
    assert sidecar["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert sorted(p.name for p in plan.parent.iterdir()) == ["unet-fp16.plan", "unet-fp16.plan.json"]


def _corrupt_json(path: Path) -> None:
    path.write_text("{not json")


def _drop_field(path: Path) -> None:
    data = json.loads(path.read_text())
    del data["plan_sha256"]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda plan: sidecar_path(plan).unlink(), "is missing"),
        (lambda plan: _corrupt_json(sidecar_path(plan)), "is corrupt"),
        (lambda plan: _drop_field(sidecar_path(plan)), "bad or missing 'plan_sha256'"),
        (lambda plan: plan.write_bytes(plan.read_bytes()[:100]), "truncated"),
        (lambda plan: plan.write_bytes(bytes(len(plan.read_bytes()))), "sha256 differs"),
        (lambda plan: plan.unlink(), "no plan yet"),
    ],
)
def test_damaged_cache_entries_are_rebuilt(cached_plan: tuple[Path, PlanKey], damage, needle: str) -> None:
    plan, key = cached_plan
    damage(plan)
    reason = needs_build(plan, key)
    assert reason is not None and needle in reason
    with pytest.raises(BuildError, match="--no-rebuild") as info:
        needs_build(plan, key, Rebuild.NEVER)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_plan_from_another_gpu_or_tensorrt_says_so(cached_plan: tuple[Path, PlanKey]) -> None:
    plan, _ = cached_plan
    here = _key(gpu="NVIDIA L4", compute_capability="8.9", tensorrt="10.8.0")
    reason = needs_build(plan, here)
    assert reason == (
        "it was built with TensorRT 10.7.0 on NVIDIA H100 80GB HBM3 (compute 9.0); "
        "this machine has TensorRT 10.8.0 on NVIDIA L4 (compute 8.9)"
    )
    assert needs_build(plan, _key(onnx_sha256="ef" * 32)) == "the ONNX graph changed"
    assert "shape profiles changed" in needs_build(plan, _key(profiles=()))


def test_plan_that_failed_parity_is_never_reused(tmp_path: Path) -> None:
    plan, key, data = tmp_path / "x.plan", _key(), b"plan"
    write_atomic(plan, data)
    write_sidecar(plan, key, data, {"parity": {"passed": False}})
    assert plan_problem(plan, key) == "it failed its parity gate"


def test_write_atomic_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "a.plan"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.plan"]


# -- what gets built -------------------------------------------------------------------------


def _manifest(
    precision: Precision = Precision.FP32,
    networks: tuple[Network, ...] | None = None,
    dims: ModelDims = SD15,
    family: str = "sd1",
) -> Manifest:
    """A manifest of placeholder graphs: every network of dims (or those given); the VAE in fp32."""
    specs = graph_specs(dims)
    graphs = {
        n: GraphEntry(
            f"{n.value}.onnx", f"{i:064x}", specs[n], Precision.FP32 if "vae" in n.value else precision
        )
        for i, n in enumerate(networks or dims.networks)
    }
    return Manifest(family, "epsilon", dims, 0.18215, {}, graphs)


def test_plan_targets_fp16_except_the_vae() -> None:
    plain = tuple(n for n in SD15.networks if n is not Network.UNET_CFG)
    targets = plan_targets(_manifest(networks=plain), BuildSettings())
    assert [(t.name, t.strongly_typed) for t in targets] == [
        ("text_encoder-fp16", False),
        ("unet-fp16", False),
        ("vae_decoder-fp32", False),
        ("vae_encoder-fp32", False),
    ]
    guarded = plan_targets(_manifest(Precision.FP16), BuildSettings(vae_precision=Precision.FP16))
    assert [(t.name, t.strongly_typed) for t in guarded] == [
        ("text_encoder-fp16", True),  # the ONNX is already fp16 inside: TensorRT keeps its types
        ("unet_cfg-fp16", True),  # the fused-guidance UNet replaces the plain one by default
        ("vae_decoder-fp16", False),
        ("vae_decoder-fp32", False),
        ("vae_encoder-fp16", False),
        ("vae_encoder-fp32", False),
    ]
    with pytest.raises(EngineFolderError, match="vae_encoder"):
        plan_targets(_manifest(networks=(Network.UNET,)), BuildSettings(networks=(Network.VAE_ENCODER,)))
    with pytest.raises(BuildError, match=r"the VAE builds in fp32, fp16 \(fp16 guarded by fp32\), not bf16"):
        plan_targets(_manifest(), BuildSettings(vae_precision=Precision.BF16))
    both = plan_targets(_manifest(), BuildSettings(networks=(Network.UNET, Network.UNET_CFG)))
    assert [t.name for t in both] == ["unet-fp16", "unet_cfg-fp16"]


def test_plan_index_skips_failed_plans_and_pairs_the_guarded_vae(tmp_path: Path) -> None:
    targets = plan_targets(_manifest(), BuildSettings(vae_precision=Precision.FP16))
    passed = {t.name: True for t in targets} | {"text_encoder-fp16": False, "vae_encoder-fp16": False}
    index = plan_index(targets, passed)["networks"]
    assert "text_encoder" not in index
    assert index["unet_cfg"] == {"plan": "unet_cfg-fp16.plan", "fallback": None}
    assert index["vae_decoder"] == {"plan": "vae_decoder-fp16.plan", "fallback": "vae_decoder-fp32.plan"}
    assert index["vae_encoder"] == {"plan": "vae_encoder-fp32.plan", "fallback": None}
    (tmp_path / PLAN_DIR).mkdir()
    with pytest.raises(EngineFolderError, match=r"no TensorRT plans.*sd-engine build"):
        read_plan_index(tmp_path)
    (tmp_path / PLAN_DIR / INDEX_NAME).write_text("[]")
    with pytest.raises(EngineFolderError, match="corrupt"):
        read_plan_index(tmp_path)


def test_partial_build_keeps_the_other_networks_in_the_index() -> None:
    old = {"unet": {"plan": "unet-fp16.plan", "fallback": None}, "text_encoder": {"plan": "old.plan"}}
    targets = plan_targets(_manifest(), BuildSettings(networks=(Network.TEXT_ENCODER, Network.VAE_DECODER)))
    new = plan_index(targets, {"vae_decoder-fp32": True, "text_encoder-fp16": False})
    merged = merge_index(old, new, [t.network for t in targets])["networks"]
    assert merged == {
        "unet": {"plan": "unet-fp16.plan", "fallback": None},  # not rebuilt: kept
        "vae_decoder": {"plan": "vae_decoder-fp32.plan", "fallback": None},
    }  # the text encoder failed its gate: its old entry goes too, nothing stale is used


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "Error Code 2: OutOfMemory (no further information)",
        "Requested amount of GPU memory (17179869184 bytes) could not be allocated.",
        "[virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: cudaErrorMemoryAllocation",
    ],
)
def test_out_of_memory_during_build_suggests_a_smaller_profile(message: str) -> None:
    error = build_failure(
        Network.UNET, ["some warning", message], [ShapeProfile.static(4, 1024, 1024)], 8 * GIB
    )
    assert isinstance(error, BuildOutOfMemoryError)
    text = str(error)
    assert "out of GPU memory" in text and "b4-1024x1024" in text and "smaller profile" in text
    assert "\n" not in text


def test_other_build_failures_quote_tensorrt() -> None:
    error = build_failure(Network.UNET, ["Network has dynamic inputs\nbut no profile"], [], GIB)
    assert type(error) is BuildError
    assert "Network has dynamic inputs" in str(error) and "\n" not in str(error)


def test_missing_tensorrt_is_one_line_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, like no install
    with pytest.raises(MissingDependencyError) as info:
        trt_env.import_tensorrt()
    assert 'pip install "sd-engine[tensorrt]"' in str(info.value) and "\n" not in str(info.value)


def test_missing_cuda_python_is_one_line_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r'cuda-python .*pip install "sd-engine\[tensorrt\]"'):
        trt_env.import_cudart()


def test_cuda_errors_name_the_call() -> None:
    class Status(int):
        name = "cudaErrorNoDevice"

    with pytest.raises(EngineError, match="cudaMalloc failed: cudaErrorNoDevice"):
        trt_env.cuda_check((Status(100), 0), "cudaMalloc")
    assert trt_env.cuda_check((Status(0), 42), "cudaMalloc") == 42
    assert trt_env.cuda_check((Status(0),), "cudaFree") is None


def _fake_engine_folder(root: Path, manifest: Manifest | None = None) -> Path:
    """An engine folder with a real manifest and placeholder graph files (never parsed here)."""
    root.mkdir()
    manifest = manifest or _manifest()
    for entry in manifest.graphs.values():
        (root / entry.file).write_bytes(b"")
    write_manifest(root, manifest)
    return root


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sd-engine")
    add_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["build", *argv])


def test_build_command_options() -> None:
    args = _parse("ENGINE", "--profile", "dynamic", "--batch", "1", "4", "--size", "512x512", "768x768",
                  "--refit", "--workspace", "2", "--vae", "fp16-guarded",
                  "--timing-cache", "t.cache")  # fmt: skip
    settings = build_command.settings_from_args(args, "sd1")
    assert settings.refit and settings.workspace_bytes == 2 * GIB
    assert settings.vae_precision is Precision.FP16 and settings.timing_cache == Path("t.cache")
    assert settings.rebuild is Rebuild.AUTO
    (profile,) = settings.profiles
    assert profile.batch == (1, 1, 4) and profile.width == (512, 512, 768)
    assert args.run is build_command.cmd_build


@pytest.mark.parametrize(
    ("flags", "vae", "rebuild"),
    [
        ((), Precision.FP32, Rebuild.AUTO),
        (("--vae", "fp16", "--force"), Precision.FP16, Rebuild.ALWAYS),
        (("--no-rebuild",), Precision.FP32, Rebuild.NEVER),
    ],
)
def test_vae_precision_and_rebuild_flags(flags: tuple[str, ...], vae: Precision, rebuild: Rebuild) -> None:
    settings = build_command.settings_from_args(_parse("ENGINE", *flags), "sd1")
    assert (settings.vae_precision, settings.rebuild) == (vae, rebuild)


def test_force_and_no_rebuild_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("ENGINE", "--force", "--no-rebuild")
    assert "not allowed with argument" in capsys.readouterr().err


class _Logger:
    """What trt_logger keeps: the last errors and how many there were."""

    def __init__(self, errors: list[str], count: int) -> None:
        self.errors, self.count = errors, count


def test_tensorrt_errors_since_a_call_are_quoted_on_one_line() -> None:
    logger = _Logger(["old failure"], 1)
    before = trt_env.error_count(logger)
    assert trt_env.errors_since(logger, before) == ""  # nothing new: no stale error is quoted
    logger.errors += ["IExecutionContext::setInputShape: Error Code 3: API Usage Error\n(dims out of range)"]
    logger.count += 1
    message = trt_env.errors_since(logger, before, RuntimeError("binding said no"))
    error = "IExecutionContext::setInputShape: Error Code 3: API Usage Error (dims out of range)"
    assert message == f": {error}; binding said no"
    assert trt_env.errors_since(None, 0) == "" and trt_env.error_count(None) == 0


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the missing-dependency path cannot happen")
def test_build_without_tensorrt_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine_dir = _fake_engine_folder(tmp_path / "engine")
    with pytest.raises(MissingDependencyError, match=r'pip install "sd-engine\[tensorrt\]"'):
        _parse(str(engine_dir)).run(_parse(str(engine_dir)))
    assert build_command.main([str(engine_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-engine: error: TensorRT is not installed")
    assert not (engine_dir / PLAN_DIR).exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--size", "500x512"], "multiple of 8"),
        (["--workspace", "0"], "--workspace must be positive"),
        (["--max-tokens", "100"], "multiples of 77"),
    ],
)
def test_bad_build_options_fail_before_any_gpu_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    engine_dir = _fake_engine_folder(tmp_path / "engine")
    assert build_command.main([str(engine_dir), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_build_of_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_command.main([str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "engine folder not found" in err[0]
