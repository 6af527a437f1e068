"""The benchmark harness on the tiny preset: it runs, its report is complete and consistent with its
own samples, compare mode catches regressions, and bad configurations fail with one clear line.
No timing is asserted: only structure and arithmetic."""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.bench.config import (
    ChildSpec,
    Contender,
    Device,
    Workload,
    check_available,
    check_device,
    compiler_missing,
    parse_contenders,
    unavailable,
)
from engine.bench.contenders import EngineRunner, backend_options
from engine.bench.progress import say
from engine.bench.prompts import BUILTIN_PROMPTS, load_prompts
from engine.bench.report import COMPILE_ROW, render_markdown, render_terminal
from engine.bench.stats import finalize, percentile
from engine.commands.bench import EXIT_REGRESSION, add_command, default_name, main
from engine.errors import EngineError

PARTI_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "partiprompts" / "PartiPrompts.tsv"
CONTENDERS = ("diffusers", "onnxruntime")
# Asked for too, and skipped with its reason: it cannot run on the CPU (--skip-unavailable).
OFF_DEVICE = "torch-cuda:graph+fused+compile"
RUNS, WARMUP, STEPS = 2, 1, 2
SAVED_REPORTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def bench(*argv: str, progress: Callable[[str], None] | None = None) -> int:
    """`sd-engine bench ARGV` through the parser the lead's CLI builds (progress lines to ``progress``
    when given)."""
    parser = argparse.ArgumentParser(prog="sd-engine")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.run(args) if progress is None else args.run(args, progress)


@dataclass(frozen=True)
class PartialWatch:
    """Receives a run's progress lines and keeps each with the partial report file as it stood then
    (None when there was none)."""

    path: Path
    seen: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        say(message)
        self.seen.append((message, json.loads(self.path.read_text()) if self.path.is_file() else None))

    def at(self, prefix: str) -> dict[str, Any] | None:
        """The partial report when the first line starting with ``prefix`` came."""
        return next(report for message, report in self.seen if message.startswith(prefix))


@pytest.fixture(scope="module")
def run(tiny_model: Path, tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    watch = PartialWatch(out / "tiny.partial.json")
    rc = bench(
        "--model", str(tiny_model), "--engine", str(tiny_engine),
        "--contenders", ",".join((*CONTENDERS, OFF_DEVICE)), "--skip-unavailable",
        "--size", "64", "--steps", str(STEPS), "--runs", str(RUNS), "--warmup", str(WARMUP),
        "--out", str(out), "--name", "tiny", progress=watch,
    )  # fmt: skip
    report = json.loads((out / "tiny.json").read_text())
    return {"rc": rc, "out": out, "report": report, "watch": watch}


def test_run_writes_every_field(run: dict[str, Any]) -> None:
    assert run["rc"] == 0
    report = run["report"]
    assert report["schema"] == "sd-engine-bench/1"
    assert {"cpu", "logical_cores", "physical_cores", "memory_gib", "os"} <= set(report["machine"])
    assert {"python", "sd_engine", "numpy", "onnxruntime"} <= set(report["software"])
    config = report["config"]
    assert config["baseline"] == "diffusers" and config["contenders"] == list(CONTENDERS)
    assert config["workload"]["width"] == config["workload"]["height"] == 64
    assert config["workload"]["prompts"] == list(BUILTIN_PROMPTS[:RUNS])
    assert {"torch", "diffusers", "transformers"} <= set(
        report["contenders"]["diffusers"]["info"]["versions"]
    )
    for name in CONTENDERS:
        entry = report["contenders"][name]
        assert entry["status"] == "ok"
        assert [s["phase"] for s in entry["samples"]] == ["warmup"] + ["timed"] * RUNS
        assert [s["prompt_index"] for s in entry["samples"]] == [0, 0, 1]
        for sample in entry["samples"]:
            stages = sample["stages_ms"]
            assert {"text_encoder", "unet_total", "unet_per_step", "scheduler_per_step", "vae_decode"} <= set(
                stages
            )
            assert stages["unet_calls"] == STEPS
        assert {"startup_s", "import_s", "load_s", "first_run_s", "cold_start_s"} <= set(entry["timeline"])
        assert (
            entry["timeline"]["cold_start_s"]
            >= entry["timeline"]["load_s"] + entry["timeline"]["first_run_s"]
        )
        summary = entry["summary"]
        assert set(summary["latency_ms"]) == {"n", "p50", "p90", "min", "max", "mean"}
        assert {"host_per_step", "unet_per_step", "vae_decode"} <= set(summary["stages_ms"])
        assert summary["peak_rss_mib"] > 0 and summary["it_per_s"] > 0 and summary["images_per_s"] > 0
    assert report["contenders"]["diffusers"]["ratios"]["speedup"]["latency_p50"] == 1.0


def test_same_weights_seed_and_sampler_give_the_same_image(run: dict[str, Any]) -> None:
    agreement = run["report"]["contenders"]["onnxruntime"]["agreement"]
    assert agreement["psnr_db"] is None or agreement["psnr_db"] >= 40


def test_ratios_are_computed_from_the_samples(run: dict[str, Any]) -> None:
    contenders = run["report"]["contenders"]

    def timed(name: str, get: Any) -> list[float]:
        return [get(s) for s in contenders[name]["samples"] if s["phase"] == "timed"]

    base, ours = (timed(n, lambda s: s["latency_ms"]) for n in CONTENDERS)
    ratios = contenders["onnxruntime"]["ratios"]
    assert ratios["speedup"]["latency_p50"] == pytest.approx(np.median(base) / np.median(ours))
    base_unet, our_unet = (timed(n, lambda s: s["stages_ms"]["unet_per_step"]) for n in CONTENDERS)
    assert ratios["speedup"]["unet_per_step"] == pytest.approx(np.median(base_unet) / np.median(our_unet))
    latency = contenders["onnxruntime"]["summary"]["latency_ms"]
    assert latency["p90"] == pytest.approx(np.percentile(ours, 90))
    assert (latency["min"], latency["max"]) == (min(ours), max(ours))
    rss = [contenders[n]["summary"]["peak_rss_mib"] for n in CONTENDERS]
    assert ratios["memory_ratio"] == pytest.approx(rss[1] / rss[0])


def test_csv_has_a_row_per_sample(run: dict[str, Any]) -> None:
    with (run["out"] / "tiny.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(CONTENDERS) * (RUNS + WARMUP)
    assert [r["contender"] for r in rows] == [n for n in CONTENDERS for _ in range(RUNS + WARMUP)]
    samples = [s for n in CONTENDERS for s in run["report"]["contenders"][n]["samples"]]
    assert [float(r["latency_ms"]) for r in rows] == pytest.approx([s["latency_ms"] for s in samples])


def test_markdown_and_terminal_tables(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    markdown = (run["out"] / "tiny.md").read_text()
    assert "| Module | diffusers (torch eager) | sd-engine (ONNX Runtime) |" in markdown
    assert "UNet, per step" in markdown and "Pipeline latency, p50" in markdown
    assert bench("--report", str(run["out"] / "tiny.json")) == 0
    assert "Pipeline latency, p50" in capsys.readouterr().out


def test_compare_passes_against_itself(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    path = str(run["out"] / "tiny.json")
    assert bench("--report", path, "--compare", path) == 0
    assert "0 regressions" in capsys.readouterr().out


def _doctored(report: dict[str, Any], tmp_path: Path, scale: float, **workload: Any) -> Path:
    """The report with every onnxruntime sample's times scaled, as if measured faster or slower."""
    doctored = copy.deepcopy(report)
    doctored["config"]["workload"].update(workload)
    for sample in doctored["contenders"]["onnxruntime"]["samples"]:
        sample["latency_ms"] *= scale
        sample["stages_ms"] = {
            k: v * scale if k != "unet_calls" else v for k, v in sample["stages_ms"].items()
        }
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(doctored))
    return path


def test_compare_flags_a_regression(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = _doctored(run["report"], tmp_path, scale=0.5)
    assert bench("--report", str(run["out"] / "tiny.json"), "--compare", str(baseline)) == EXIT_REGRESSION
    out = capsys.readouterr().out
    assert "onnxruntime latency p50" in out and "REGRESSION" in out


def test_compare_refuses_different_work(run: dict[str, Any], tmp_path: Path) -> None:
    baseline = _doctored(run["report"], tmp_path, scale=1.0, width=128)
    with pytest.raises(EngineError, match="different work: width 128 -> 64"):
        bench("--report", str(run["out"] / "tiny.json"), "--compare", str(baseline))


def test_compare_refuses_different_work_before_running(
    run: dict[str, Any], tiny_model: Path, tiny_engine: Path
) -> None:
    with pytest.raises(EngineError, match="different work: width 64 -> 128"):
        bench("--model", str(tiny_model), "--engine", str(tiny_engine), "--size", "128",
              "--compare", str(run["out"] / "tiny.json"))  # fmt: skip


def test_chart(run: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert bench("--report", str(run["out"] / "tiny.json"), "--out", str(tmp_path), "--chart") == 0
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--contenders", "diffusers,onnx"],
            "unknown contender 'onnx'; valid contenders: diffusers, onnxruntime",
        ),
        (["--contenders", "diffusers,torch-cuda:graph+turbo"], "unknown option 'turbo' in contender"),
        (["--contenders", "diffusers,torch-cuda:graph+eager"], "sets cuda_graph both ways"),
        (["--contenders", "diffusers,tensorrt"], "contender 'tensorrt' runs on a CUDA GPU"),
        (["--contenders", "diffusers,torch:graph"], "eager / graph is an option of"),
        (["--contenders", "diffusers:fp16"], "contender 'diffusers:fp16': fp16 needs --device cuda"),
        (["--contenders", "diffusers,openvino", "--device", "cuda"], "contender 'openvino' runs on the CPU"),
        (["--size", "250"], "multiples of 8 px"),
        (["--size", "big"], "--size must be N or WxH"),
        (["--runs", "0"], "--runs must be at least 1"),
        (["--sampler", "Euler z"], "unknown sampler 'Euler z'"),
        (["--sampler", "DPM++ 2S a"], "has no diffusers scheduler"),
        (["--compare", "/nonexistent/base.json"], "benchmark report not found: /nonexistent/base.json"),
        (["--engine", "/nonexistent/engine"], "engine folder not found"),
        (["--threshold", "0"], "--threshold must be a fraction above 0"),
    ],
)
def test_bad_configuration_is_one_clear_line(tiny_model: Path, args: list[str], message: str) -> None:
    with pytest.raises(EngineError, match=_literal(message)) as error:
        bench("--model", str(tiny_model), *args)
    assert "\n" not in str(error.value)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="model folder not found"):
        bench("--model", str(tmp_path / "nope"))
    with pytest.raises(EngineError, match="exactly one of --model MODEL_DIR or --preset"):
        bench()


def test_corrupt_compare_file(tiny_model: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(EngineError, match="cannot read benchmark report"):
        bench("--model", str(tiny_model), "--compare", str(corrupt))
    corrupt.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(EngineError, match="is not an sd-engine benchmark report"):
        bench("--report", str(corrupt))


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# comment\nfirst prompt\n\n  second prompt  \n")
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\nalpha\tx\nbeta\ty\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n"two"\n\n{"Prompt": "three"}\n')
    (tmp_path / "bad.tsv").write_text("Text\tCategory\nalpha\tx\n")
    assert load_prompts(tmp_path / "p.txt") == ("first prompt", "second prompt")
    assert load_prompts(tmp_path / "p.tsv") == ("alpha", "beta")
    assert load_prompts(tmp_path / "p.jsonl") == ("one", "two", "three")
    assert load_prompts(None) == BUILTIN_PROMPTS
    with pytest.raises(ValueError, match="has no Prompt column"):
        load_prompts(tmp_path / "bad.tsv")
    prompts = load_prompts(PARTI_PROMPTS)
    assert len(prompts) == 1632 and prompts[0] == "bond"


def test_percentile_interpolates_linearly() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([1.0, 2.0, 3.0], 90) == pytest.approx(2.8)
    assert percentile([5.0], 90) == 5.0


# -- the graphs a run used, and nothing more (issue 10 part 7) ----------------------------------------


def test_report_names_the_graphs_the_run_used(run: dict[str, Any]) -> None:
    """The tiny engine has unet_cfg: the default run guides inside it and never touches the plain UNet."""
    info = run["report"]["contenders"]["onnxruntime"]["info"]
    assert info["graphs"] == ["text_encoder", "unet_cfg", "vae_decoder"]
    assert info["fused_cfg"] is True and info["contender"] == "onnxruntime"


def _runner(engine: Path, tmp_path: Path, contender: str) -> EngineRunner:
    workload = Workload(prompts=("a red cube",), width=64, height=64, steps=2)
    spec = ChildSpec(Contender.parse(contender), engine, engine, workload, 1, 0, Device.CPU, tmp_path)
    runner = EngineRunner(spec)
    runner.import_libraries()
    runner.load()
    return runner


@pytest.mark.parametrize(
    ("contender", "unet"), [("onnxruntime", "unet_cfg"), ("onnxruntime:unfused", "unet")]
)
def test_info_loads_no_graph_the_run_did_not_use(
    tiny_engine: Path, tmp_path: Path, contender: str, unet: str
) -> None:
    """info() used to load the plain UNet before peak RSS was read (and failed without its plan)."""
    from engine.specs import Network

    runner = _runner(tiny_engine, tmp_path, contender)
    image, stages = runner.generate("a red cube", lambda step, total: None)
    assert image.shape == (64, 64, 3) and stages["unet_calls"] == 2
    info = runner.info()
    assert info["graphs"] == ["text_encoder", unet, "vae_decoder"]
    loaded = {n.value for n in runner.pipe._graphs}  # what the pipeline holds in memory
    assert loaded == {"text_encoder", unet, "vae_decoder"}
    other = Network.UNET if unet == "unet_cfg" else Network.UNET_CFG
    assert other.value not in loaded


# -- contenders and their options ----------------------------------------------------------------------


def test_contender_names_round_trip() -> None:
    names = "diffusers:fp16,torch-cuda:eager+unfused,torch-cuda:graph+fused,onnxruntime:graph+fused,tensorrt"
    contenders = parse_contenders(names + ",TensorRT")
    assert [c.name for c in contenders] == names.split(",")
    assert Contender.parse("torch-cuda:fused+graph").name == "torch-cuda:graph+fused"
    assert contenders[0].label == "diffusers (torch eager fp16)"
    assert contenders[2].label == "sd-engine (torch-cuda) graph + fused"
    assert [c.fused_cfg for c in contenders] == [None, False, True, True, None]


def test_backend_options_use_the_one_vocabulary() -> None:
    assert backend_options(Contender.parse("onnxruntime:graph+fused"), Device.CUDA) == {
        "cuda_graph": True,
        "device": "cuda",
    }
    assert backend_options(Contender.parse("onnxruntime"), Device.CPU) == {"device": "cpu"}
    trt = backend_options(Contender.parse("tensorrt:eager"), Device.CUDA)
    assert trt == {"cuda_graph": False, "timing": True}


def test_unavailable_contenders_are_skipped_with_a_reason_or_refused(tmp_path: Path) -> None:
    """tensorrt without plans (or without the package) cannot run: refused, or skipped on request."""
    contenders = parse_contenders("diffusers,tensorrt:graph+fused")
    kept, skipped = check_available(contenders, Device.CUDA, tmp_path, skip=True)
    assert [c.name for c in kept] == ["diffusers"]
    assert [name for name, _ in skipped] == ["tensorrt:graph+fused"]
    assert "tensorrt" in skipped[0][1] and "\n" not in skipped[0][1]
    refused = r"'tensorrt:graph\+fused' cannot run here: (needs tensorrt|no TensorRT)"
    with pytest.raises(ValueError, match=refused):
        check_available(contenders, Device.CUDA, tmp_path, skip=False)


def test_gpu_contenders_without_cuda_are_refused_in_one_line(tiny_model: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(EngineError, match="--device cuda: no CUDA GPU visible to torch") as error:
        bench("--model", str(tiny_model), "--device", "cuda", "--contenders", "diffusers,torch-cuda:graph")
    assert "\n" not in str(error.value)


def test_dry_run_lists_the_gpu_contenders(capsys: pytest.CaptureFixture[str]) -> None:
    contenders = "diffusers:fp16,torch-cuda:eager+unfused,onnxruntime:graph+fused,tensorrt:graph+fused"
    argv = (
        "--dry-run",
        "--device",
        "cuda",
        "--contenders",
        contenders,
        "--size",
        "512",
        "--skip-unavailable",
    )
    assert bench(*argv) == 0
    out = capsys.readouterr().out
    assert "dry run: 512x512" in out
    assert "[2] torch-cuda:eager+unfused" in out and "'cuda_graph': False" in out
    assert "[4] tensorrt:graph+fused" in out


def test_onnx_contenders_skip_a_torch_only_engine_folder(
    tiny_torch_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("--dry-run", "--engine", str(tiny_torch_engine), "--contenders", "torch,onnxruntime,openvino")
    assert bench(*argv, "--skip-unavailable") == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  [1] torch (") and "options" in line for line in lines)
    for name in ("onnxruntime", "openvino"):
        line = next(line for line in lines if f"] {name} (" in line)
        assert line.endswith(
            f"would skip: engine folder {tiny_torch_engine} was exported with --torch-only (no ONNX graphs)"
        )


def test_dry_run_says_refuse_or_skip_as_the_run_would(capsys: pytest.CaptureFixture[str]) -> None:
    """Without tensorrt installed, the run refuses the contender unless --skip-unavailable is given."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    argv = ("--dry-run", "--device", "cuda", "--contenders", "diffusers:fp16,tensorrt:graph+fused")
    assert bench(*argv) == 1  # the run would refuse: a script stops before spending a GPU slot
    out = capsys.readouterr().out
    assert "[2] tensorrt:graph+fused (" in out and "would refuse the run: " in out
    assert bench(*argv, "--skip-unavailable") == 0
    assert "would skip: " in capsys.readouterr().out


def test_psnr_against_the_fp32_cpu_reference(tiny_model: Path, tiny_engine: Path, tmp_path: Path) -> None:
    rc = bench(
        "--model", str(tiny_model), "--engine", str(tiny_engine), "--contenders", "onnxruntime:unfused",
        "--size", "64", "--steps", "2", "--runs", "1", "--warmup", "0", "--psnr-reference", "cpu-fp32",
        "--out", str(tmp_path), "--name", "ref",
    )  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "ref.json").read_text())
    assert report["config"]["psnr_reference"] == "cpu-fp32"
    entry = report["contenders"]["onnxruntime:unfused"]
    assert entry["info"]["graphs"] == ["text_encoder", "unet", "vae_decoder"]
    psnr = entry["agreement"]["psnr_db"]
    assert psnr is None or psnr >= 40
    assert "PSNR of first image vs diffusers fp32 CPU" in (tmp_path / "ref.md").read_text()


def test_device_times_and_skipped_contenders_in_the_report(run: dict[str, Any]) -> None:
    """A contender that records UNet device time gets its rows; a skipped one is shown, not failed."""
    report = copy.deepcopy(run["report"])
    for sample in report["contenders"]["onnxruntime"]["samples"]:
        sample["stages_ms"]["unet_device_per_step"] = sample["stages_ms"]["unet_per_step"] / 2
    skipped = {"label": "sd-engine (TensorRT)", "status": "skipped", "error": "no plans"}
    report["contenders"]["tensorrt"] = skipped
    report = finalize(report)
    summary = report["contenders"]["onnxruntime"]["summary"]
    timed = [s for s in report["contenders"]["onnxruntime"]["samples"] if s["phase"] == "timed"]
    device = [s["stages_ms"]["unet_device_per_step"] for s in timed]
    assert summary["unet_device_per_step_ms"] == pytest.approx(np.median(device))
    gaps = [
        (s["latency_ms"] - s["stages_ms"]["text_encoder"] - s["stages_ms"]["vae_decode"]) / STEPS - d
        for s, d in zip(timed, device, strict=True)
    ]
    assert summary["gap_per_step_ms"] == pytest.approx(np.median(gaps))
    assert report["contenders"]["diffusers"]["summary"]["unet_device_per_step_ms"] is None
    text = render_terminal(report)
    assert "UNet device time, per step" in text and "skipped: no plans" in text
    assert "UNet device time" not in render_terminal(run["report"])


# -- torch.compile contenders, the GPU PSNR reference, device skips, start-up columns (issue 12) -------


def test_compile_contenders_parse_in_a_fixed_order() -> None:
    contenders = parse_contenders(
        "torch-cuda:compile+fused+graph,torch:fused+compile,torch-cuda:eager+compile"
    )
    assert [c.name for c in contenders] == [
        "torch-cuda:graph+fused+compile",
        "torch:fused+compile",
        "torch-cuda:eager+compile",
    ]
    assert [c.compile for c in contenders] == [True, True, True]
    assert contenders[0].label == "sd-engine (torch-cuda) graph + fused + torch.compile"
    assert Contender.parse("torch-cuda:graph").compile is None
    assert backend_options(contenders[0], Device.CUDA) == {
        "cuda_graph": True,
        "compile": True,
        "timing": True,
    }
    assert backend_options(contenders[1], Device.CPU) == {"compile": True}
    spec = ChildSpec(
        contenders[0], Path("m"), Path("e"), Workload(prompts=("a",)), 1, 0, Device.CUDA, Path("o")
    )
    assert ChildSpec.from_json(spec.to_json()).contender == contenders[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "onnxruntime:compile",
            "contender 'onnxruntime:compile': compile (torch.compile) is an option of torch",
        ),
        ("tensorrt:graph+compile", "compile (torch.compile) is an option of torch, torch-cuda"),
        ("diffusers:fp16+compile", "diffusers takes only fp16 / fp32"),
    ],
)
def test_compile_is_refused_where_nothing_compiles(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=_literal(message)):
        Contender.parse(text)


def test_cuda_fp32_reference_needs_the_gpu(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(
        EngineError, match="--psnr-reference cuda-fp32 runs diffusers fp32 on the GPU"
    ) as error:
        bench("--model", str(tiny_model), "--psnr-reference", "cuda-fp32")
    assert "needs --device cuda" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(EngineError, match="needs --device cuda"):
        bench("--dry-run", "--psnr-reference", "cuda-fp32")
    argv = (
        "--dry-run",
        "--device",
        "cuda",
        "--psnr-reference",
        "cuda-fp32",
        "--contenders",
        "diffusers:fp16",
    )
    assert bench(*argv) == 0
    assert "PSNR against cuda-fp32" in capsys.readouterr().out


def test_contenders_for_another_device_are_skipped_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    """On the CPU, GPU contenders are skipped with the reason (the baseline never is), or refused."""
    contenders = parse_contenders(
        "diffusers,torch:fused+compile,diffusers:fp16,torch-cuda:graph+fused+compile,onnxruntime:graph+fused"
    )
    kept, skipped = check_device(contenders, Device.CPU, skip=True)
    assert [c.name for c in kept] == ["diffusers", "torch:fused+compile"]
    assert dict(skipped) == {
        "diffusers:fp16": "fp16 needs --device cuda",
        "torch-cuda:graph+fused+compile": "runs on a CUDA GPU, not --device cpu",
        "onnxruntime:graph+fused": "graph (CUDA graphs) needs --device cuda",
    }
    with pytest.raises(ValueError, match="'torch-cuda:graph\\+fused\\+compile' runs on a CUDA GPU; drop it"):
        check_device((contenders[0], contenders[3]), Device.CPU)
    with pytest.raises(ValueError, match="contender 'diffusers:fp16': fp16 needs --device cuda"):
        check_device(contenders[2:], Device.CPU, skip=True)  # the baseline
    argv = ("--dry-run", "--contenders", "diffusers,torch-cuda:graph+fused+compile,torch:fused+compile")
    assert bench(*argv, "--skip-unavailable") == 0
    out = capsys.readouterr().out
    assert "[2] torch-cuda:graph+fused+compile (" in out
    assert "would skip: runs on a CUDA GPU, not --device cpu" in out
    assert (
        "[3] torch:fused+compile (sd-engine (torch) fused + torch.compile): options {'compile': True}" in out
    )
    with pytest.raises(EngineError, match="runs on a CUDA GPU; drop it from --contenders"):
        bench(*argv)


def test_skipped_contenders_land_in_the_report(run: dict[str, Any]) -> None:
    report = run["report"]
    assert report["config"]["contenders"] == list(CONTENDERS)
    assert report["config"]["skipped"] == {OFF_DEVICE: "runs on a CUDA GPU, not --device cpu"}
    entry = report["contenders"][OFF_DEVICE]
    assert entry["status"] == "skipped" and entry["label"].endswith("graph + fused + torch.compile")
    assert "skipped: runs on a CUDA GPU" in (run["out"] / "tiny.md").read_text()


def test_first_run_overhead_and_compile_time(run: dict[str, Any]) -> None:
    """first-run overhead = first run - warm p50; compile time from the contender's info, when it compiled."""
    report = copy.deepcopy(run["report"])
    for name in CONTENDERS:
        summary = report["contenders"][name]["summary"]
        expected = report["contenders"][name]["timeline"]["first_run_s"] - summary["latency_ms"]["p50"] / 1000
        assert summary["first_run_overhead_s"] == pytest.approx(expected)
        assert summary["compile_s"] is None
    text = render_terminal(report)
    assert "first-run overhead (first run - p50)" in text and COMPILE_ROW not in text
    report["contenders"]["onnxruntime"]["info"]["compile_s"] = 42.5
    report = finalize(report)
    assert report["contenders"]["onnxruntime"]["summary"]["compile_s"] == 42.5
    markdown = render_markdown(report)
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {COMPILE_ROW} |"))
    assert row.split("|")[2:4] == [" - ", " 42.5 s "]


@pytest.mark.parametrize(
    "name", ["cpu-2core-sd15-256-2026-11-25.json", "cpu-2core-sd15-512-2026-12-01-quiet.json"]
)
def test_saved_reports_without_the_new_fields_still_render(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reports saved before compile times existed re-render, with first-run overhead from their timeline."""
    path = SAVED_REPORTS / name
    assert bench("--report", str(path), "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "Pipeline latency, p50" in out and "first-run overhead" in out and COMPILE_ROW not in out
    saved = json.loads((tmp_path / name).read_text())
    assert all(
        e["summary"]["compile_s"] is None and e["summary"]["first_run_overhead_s"] is not None
        for e in saved["contenders"].values()
        if e.get("summary")
    )


@pytest.mark.slow  # TorchInductor's C++ kernels for the tiny UNet: minutes on 2 cores with a cold cache
def test_torch_compile_contender_on_the_cpu(tiny_model: Path, tiny_engine: Path, tmp_path: Path) -> None:
    rc = bench(
        "--model", str(tiny_model), "--engine", str(tiny_engine),
        "--contenders", "torch:fused,torch:fused+compile", "--size", "64", "--steps", "2",
        "--runs", "1", "--warmup", "1", "--out", str(tmp_path), "--name", "c",
    )  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "c.json").read_text())
    entry = report["contenders"]["torch:fused+compile"]
    assert entry["info"]["providers"] == ["torch:cpu:compiled"] and entry["summary"]["compile_s"] > 0
    assert report["contenders"]["torch:fused"]["summary"]["compile_s"] is None
    psnr = entry["agreement"]["psnr_db"]
    assert psnr is None or psnr >= 40
    assert COMPILE_ROW in (tmp_path / "c.md").read_text()


def test_compile_contenders_need_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torch.compile builds kernels with a C/C++ compiler: without one the contender is skipped."""
    contender = Contender.parse("torch:fused+compile")
    assert compiler_missing(Contender.parse("torch:fused")) is None
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    reason = unavailable(contender, Device.CPU, None)
    assert (
        reason
        == f"torch.compile on the CPU needs a C++ compiler: {tmp_path / 'no-such-c++'} not found (set $CXX)"
    )
    kept, skipped = check_available(
        parse_contenders("diffusers,torch:fused+compile"), Device.CPU, None, skip=True
    )
    assert [c.name for c in kept] == ["diffusers"] and skipped == (("torch:fused+compile", reason),)
    if importlib.util.find_spec("triton") is None:
        assert compiler_missing(Contender.parse("torch-cuda:graph+compile")) == (
            "torch.compile on CUDA needs triton, which is not installed"
        )


def _no_cuda() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(_no_cuda() is not None, reason=str(_no_cuda()))
def test_event_clock_times_device_work_per_call_and_waits_once() -> None:
    import torch

    from engine.bench.contenders import EventClock

    layer = torch.nn.Linear(1024, 1024).cuda()
    clock = EventClock()
    clock.wrap(layer, "forward", "linear")
    x = torch.randn(4096, 1024, device="cuda")
    for _ in range(3):
        clock.reset()
        for _ in range(5):
            x = layer(x).tanh()
        clock.finish()
        assert clock.calls == {"linear": 5} and len(clock.per_call_ms("linear")) == 5
        assert (
            clock.totals["linear"] == pytest.approx(sum(clock.per_call_ms("linear")))
            and clock.totals["linear"] > 0
        )


# -- what a killed run keeps, a failed reference, the dry run's exit status (issue 12) -----------------


def test_the_partial_report_follows_the_run_and_goes_when_it_completes(run: dict[str, Any]) -> None:
    """Before each contender the partial file holds the report so far; the completed run removes it."""
    watch, final = run["watch"], run["report"]
    first, second = watch.at("[1/2]"), watch.at("[2/2]")
    assert first is not None and second is not None
    assert first["partial"] is True and first["not_run"] == list(CONTENDERS)
    assert {n: e["status"] for n, e in first["contenders"].items()} == {
        "diffusers": "not run",
        "onnxruntime": "not run",
        OFF_DEVICE: "skipped",
    }
    assert second["not_run"] == ["onnxruntime"]
    done = second["contenders"]["diffusers"]
    assert done["status"] == "ok" and done["samples"] == final["contenders"]["diffusers"]["samples"]
    assert done["summary"] == final["contenders"]["diffusers"]["summary"]
    assert done["ratios"]["speedup"]["latency_p50"] == 1.0
    assert second["contenders"]["onnxruntime"]["status"] == "not run"
    assert default_name(second) == default_name(final)  # the stem without --name is known at the start
    assert "partial" not in final and "not_run" not in final
    assert sorted(p.name for p in run["out"].iterdir()) == ["tiny.csv", "tiny.json", "tiny.md"]


def test_a_partial_report_renders_with_what_did_not_run(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tiny.partial.json"  # as a run killed during its second contender leaves it
    path.write_text(json.dumps(run["watch"].at("[2/2]")))
    assert bench("--report", str(path), "--out", str(tmp_path / "out")) == 0
    notice = "PARTIAL REPORT: the benchmark stopped before it finished; not run: onnxruntime"
    cell = "not run: the benchmark stopped before it finished"
    terminal = capsys.readouterr().out
    markdown = (tmp_path / "out" / "tiny.partial.md").read_text()
    for text in (terminal, markdown):
        assert notice in text and cell in text and "Pipeline latency, p50" in text
    latency = next(line for line in markdown.splitlines() if line.startswith("| Pipeline latency, p50 |"))
    assert latency.endswith(f"| {cell} | skipped: runs on a CUDA GPU, not --device cpu |")


def test_a_failed_reference_run_keeps_the_contenders(
    tiny_model: Path, tiny_engine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """diffusers cannot load the model folder (its UNet weights cut short, as by a copy that stopped)
    while the engine folder runs: every contender runs, the PSNR column is empty with the reason."""
    broken = Path(shutil.copytree(tiny_model, tmp_path / "broken"))
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    watch = PartialWatch(out / "ref.partial.json")
    reason = "the fp32 CPU reference run failed: OSError: Unable to load weights from checkpoint file"
    with pytest.raises(EngineError, match=_literal(reason)):
        bench(
            "--model", str(broken), "--engine", str(tiny_engine), "--contenders", "onnxruntime:unfused",
            "--size", "64", "--steps", "2", "--runs", "1", "--warmup", "0", "--psnr-reference", "cpu-fp32",
            "--out", str(out), "--name", "ref", progress=watch,
        )  # fmt: skip
    report = json.loads((out / "ref.json").read_text())
    error = report["config"]["psnr_reference_error"]
    assert error.startswith(reason) and "\n" not in error
    entry = report["contenders"]["onnxruntime:unfused"]
    assert entry["status"] == "ok" and entry["summary"]["it_per_s"] > 0
    assert "agreement" not in entry  # not compared with anything else instead
    said = [message for message, _ in watch.seen if message.startswith("[reference] the fp32 CPU")]
    assert said == [f"[reference] {error}; the contenders run, the PSNR column stays empty"]
    partial = watch.at("[1/1]")
    assert partial is not None and partial["config"]["psnr_reference_error"] == error
    assert not (out / "ref.partial.json").exists()
    markdown = (out / "ref.md").read_text()
    assert "| PSNR of first image vs diffusers fp32 CPU | - |" in markdown
    for text in (markdown, capsys.readouterr().out):
        assert f"PSNR column empty: {error}" in text


def test_dry_run_exits_1_when_the_run_would_be_refused(
    tiny_torch_engine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A baseline that cannot run (ONNX Runtime on a torch-only engine folder) is refused, skip or not;
    another contender only without --skip-unavailable."""
    engine = ("--dry-run", "--engine", str(tiny_torch_engine))
    assert main([*engine, "--contenders", "onnxruntime,torch", "--skip-unavailable"]) == 1
    line = "  [1] onnxruntime (sd-engine (ONNX Runtime)): would refuse the run: engine folder"
    assert line in capsys.readouterr().out  # the plan is printed all the same
    assert bench(*engine, "--contenders", "torch,onnxruntime") == 1
    assert bench(*engine, "--contenders", "torch,onnxruntime", "--skip-unavailable") == 0
