"""`sd-engine bench`: one command for "how fast is sd-engine on my machine, against what I use today".

    sd-engine bench --preset sd15 --size 256 --contenders diffusers,onnxruntime --runs 3 --out results/
    sd-engine bench --preset sdxl --steps 20 --contenders diffusers,onnxruntime,openvino \
        --psnr-reference cpu-fp32 --runs 1 --out results/                  # 1024x1024 by default
    sd-engine bench --report results/x.json --compare baseline.json     # re-render / compare, no run
    sd-engine bench --model M --engine E --device cuda --psnr-reference cuda-fp32 --skip-unavailable \
        --contenders diffusers:fp16,torch-cuda:eager+unfused,torch-cuda:graph+fused,\
torch-cuda:graph+fused+compile,tensorrt:graph+fused

``add_command`` registers the subcommand on the `sd-engine` parser; ``main`` runs it alone
(benchmarks/run.py). User mistakes raise :class:`EngineError` (one line, exit 1); a regression
found by ``--compare`` exits with ``EXIT_REGRESSION``; ``--dry-run`` exits 1 when the run would be
refused.

With ``--out``, a run keeps ``OUT/NAME.partial.json`` up to date (after the PSNR reference run and
after every contender, written atomically): a run killed by a time cap leaves what it measured, and
``--report OUT/NAME.partial.json`` renders it. A run that completes writes NAME.json / .csv / .md and
removes the partial file. A failed PSNR reference run does not stop the run: the PSNR column stays
empty with its reason, and the command exits 1 at the end, as for a failed contender.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from engine.bench.progress import say
from engine.errors import EngineError

EXIT_REGRESSION = 3
EXIT_REFUSED = 1  # --dry-run: the real run would refuse to start
PARTIAL_SUFFIX = ".partial.json"
DEFAULT_CONTENDERS = "diffusers,onnxruntime"
MAX_SEED = 2**32 - 1


def add_command(subparsers: Any) -> None:
    """Register `bench` on an argparse subparsers object (``set_defaults(run=run_bench)``)."""
    cmd = subparsers.add_parser(
        "bench",
        help="benchmark sd-engine against diffusers, side by side, per stage",
        description="Run the same work on several contenders, each in its own process, and report cold "
        "start, load, warm latency (p50/p90/min/max), per-stage times, it/s, images/s, peak memory and "
        "each contender's ratio to the first one (the baseline).",
    )
    _add_model_arguments(cmd)
    _add_workload_arguments(cmd)
    _add_output_arguments(cmd)
    cmd.set_defaults(run=run_bench)


def _add_model_arguments(cmd: argparse.ArgumentParser) -> None:
    from engine.models.presets import Preset

    group = cmd.add_argument_group("model")
    group.add_argument("--model", type=Path, metavar="MODEL_DIR", help="a diffusers model folder")
    group.add_argument(
        "--preset",
        choices=[p.value for p in Preset],
        help="random weights in a real architecture, built once into $SD_ENGINE_HOME/bench",
    )
    group.add_argument(
        "--engine",
        type=Path,
        metavar="ENGINE_DIR",
        help="exported engine folder (default: export into a cache)",
    )
    group.add_argument(
        "--contenders",
        default=DEFAULT_CONTENDERS,
        metavar="NAME[:OPT+OPT],...",
        help=f"comma-separated, the first is the baseline (default {DEFAULT_CONTENDERS}); NAME is "
        "diffusers or a backend (onnxruntime, torch, torch-cuda, tensorrt, openvino); OPT: eager / graph "
        "(CUDA graphs), fused / unfused (guidance in the unet_cfg graph or on the host), compile "
        "(torch.compile of the UNet: torch, torch-cuda), fp16 / fp32 (diffusers), "
        "e.g. torch-cuda:graph+fused+compile",
    )
    group.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where diffusers, torch and onnxruntime run "
        "(default cpu); torch-cuda and tensorrt need cuda, openvino cpu",
    )
    group.add_argument(
        "--skip-unavailable",
        action="store_true",
        help="skip (with the reason) contenders this machine cannot run: another --device, missing "
        "packages, no CUDA provider in onnxruntime, no TensorRT plans, no bf16 arithmetic for openvino (the "
        "first contender, the baseline, is never skipped); default: refuse",
    )


def _add_workload_arguments(cmd: argparse.ArgumentParser) -> None:
    group = cmd.add_argument_group("workload (the same for every contender)")
    group.add_argument(
        "--size",
        metavar="N|WxH",
        help="image size in px (default 256; an SDXL model's native size: 1024 for SDXL base)",
    )
    group.add_argument("--steps", type=int, default=20, help="(default 20)")
    group.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    group.add_argument("--sampler", default="Euler a", help="(default: Euler a)")
    group.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    group.add_argument("--runs", type=int, default=3, help="timed runs (default 3)")
    group.add_argument("--warmup", type=int, default=1, help="untimed runs first; the first is the cold one")
    group.add_argument("--seed", type=int, default=42, help="image i of a run gets seed + i (default 42)")
    group.add_argument("--prompts", type=Path, metavar="FILE", help=".txt, .tsv (Prompt column) or .jsonl")
    group.add_argument("--negative", default="", metavar="TEXT", help="negative prompt (default empty)")
    group.add_argument(
        "--no-prewarm", action="store_true", help="do not pre-read model files into the OS file cache"
    )


def _add_output_arguments(cmd: argparse.ArgumentParser) -> None:
    from engine.bench.config import PSNR_REFERENCES

    group = cmd.add_argument_group("output")
    group.add_argument(
        "--psnr-reference",
        choices=list(PSNR_REFERENCES),
        default="baseline",
        help="compare each first image with the baseline's (default), or with diffusers fp32 on the CPU "
        "or on the CUDA GPU (cuda-fp32 needs --device cuda; one extra untimed run; if it fails, the "
        "contenders still run and the PSNR column stays empty, with the reason)",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="check the contenders and workload, print what would run, run nothing (no model needed); "
        "exit status 1 when the run would be refused",
    )
    group.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write NAME.json, .csv, .md (and .png) here; while the run goes on, NAME.partial.json holds "
        "the results so far (left behind by a run that is killed; --report renders it)",
    )
    group.add_argument("--name", help="file name stem (default: MACHINE-MODEL-SIZE-DATE)")
    group.add_argument(
        "--chart", action="store_true", help="also a PNG of the per-stage breakdown (matplotlib)"
    )
    group.add_argument("--compare", type=Path, metavar="BASELINE.json", help="flag regressions against it")
    group.add_argument(
        "--threshold", type=float, default=0.10, help="regression threshold, a fraction (default 0.10)"
    )
    group.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="RESULT.json",
        help="re-render saved reports instead of running",
    )
    group.add_argument("--summary", type=Path, metavar="FILE.md", help="one markdown table over all reports")


def run_bench(args: argparse.Namespace, progress: Callable[[str], None] = say) -> int:
    """The subcommand; ValueError from validation becomes a one-line EngineError.

    ``progress`` receives the run's progress lines (stderr by default); a partial report file, when
    written, is up to date whenever it receives a contender's "[N/M]" line.
    """
    try:
        return _bench(args, progress)
    except ValueError as error:
        raise EngineError(str(error)) from None


def _bench(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    from engine.bench.compare import check_comparable, compare, read_report, render_changes
    from engine.bench.report import render_terminal

    check_output_options(args)
    if args.dry_run:
        plan = dry_run(args)
        print(plan.text, flush=True)
        return EXIT_REFUSED if plan.refused else 0
    before = read_report(args.compare) if args.compare else None
    if args.report:
        reports = [read_report(path) for path in args.report]
    else:
        from engine.bench.runner import measure

        config = build_config(args)
        if before is not None:  # refuse before spending minutes, not after
            check_comparable(before, {"config": config.to_json()})
        checkpoint = functools.partial(save_partial, out=args.out, name=args.name) if args.out else None
        reports = [measure(config, progress, checkpoint)]
    for report in reports:
        print(render_terminal(report), flush=True)
    write_outputs(reports, args)
    check_failures(reports)
    if before is None:
        return 0
    changes = compare(before, reports[0], args.threshold)
    print(render_changes(changes, args.threshold), flush=True)
    return EXIT_REGRESSION if any(c.regressed for c in changes) else 0


def check_output_options(args: argparse.Namespace) -> None:
    from engine.bench.writers import check_chart_support

    if not 0 < args.threshold < 10:
        raise ValueError(f"--threshold must be a fraction above 0 (0.10 is 10%), got {args.threshold}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out must be a folder, got the file {args.out}")
    if args.chart and args.out is None:
        raise ValueError("--chart needs --out DIR")
    if args.chart:
        check_chart_support()
    if args.compare is not None and args.report and len(args.report) > 1:
        raise ValueError("--compare takes a single --report")
    if args.report and (args.model or args.preset or args.engine):
        raise ValueError("--report re-renders saved reports: it takes no --model, --preset or --engine")
    if args.summary is not None and not args.summary.parent.is_dir():
        raise ValueError(f"--summary folder does not exist: {args.summary.parent}")


@dataclass(frozen=True)
class Plan:
    """What ``--dry-run`` prints, and whether the real run would refuse to start (a contender that
    cannot run here and is not skipped, the baseline above all: it is never skipped)."""

    text: str
    refused: bool


def dry_run(args: argparse.Namespace) -> Plan:
    """What a run would do: each contender and its backend options, or why it would be skipped (with
    --skip-unavailable) or refused.

    Checks the contenders, workload and devices' rules, but not whether a GPU is present. ValueError
    for what the run refuses before looking at contenders (bad workload, a contender on the wrong
    device without --skip-unavailable).
    """
    from engine.bench.config import Device, check_psnr_reference, parse_contenders, parse_size, unavailable
    from engine.bench.contenders import backend_options
    from engine.bench.models import ModelChoice, default_size

    contenders = parse_contenders(args.contenders)
    choice = ModelChoice(args.model, args.preset, args.engine)
    width, height = parse_size(args.size) if args.size is not None else default_size(choice)
    check_numbers(args)
    device = Device(args.device)
    check_psnr_reference(args.psnr_reference, device)
    lines = [
        f"dry run: {width}x{height}, {args.steps} steps, {args.runs} timed runs, device {device.value}, "
        f"PSNR against {args.psnr_reference}"
    ]
    refused = False
    for number, contender in enumerate(contenders, start=1):
        if number == 1 or not args.skip_unavailable:
            contender.check_device(device)  # refused, as the run would
        reason = unavailable(contender, device, args.engine)
        options = backend_options(contender, device) if contender.is_engine else {}
        fused = "" if contender.fused_cfg is None else f" fused_cfg={contender.fused_cfg}"
        if reason:
            skips = args.skip_unavailable and number > 1  # the baseline is never skipped
            state = f"would skip: {reason}" if skips else f"would refuse the run: {reason}"
            refused = refused or not skips
        else:
            state = f"options {options}{fused}"
        lines.append(f"  [{number}] {contender.name} ({contender.label}): {state}")
    return Plan("\n".join(lines), refused)


def build_config(args: argparse.Namespace) -> Any:
    """Validate everything cheap first, then build the model / engine folders if needed."""
    from engine.bench.config import (
        BenchConfig,
        Device,
        Workload,
        check_available,
        check_device,
        check_psnr_reference,
        check_sampler,
        parse_contenders,
        parse_size,
    )
    from engine.bench.models import ModelChoice, check_choice, default_size, prepare
    from engine.bench.prompts import load_prompts

    contenders = parse_contenders(args.contenders)
    size = parse_size(args.size) if args.size is not None else None
    check_numbers(args)
    check_sampler(args.sampler, contenders)
    device = Device(args.device)
    check_psnr_reference(args.psnr_reference, device)
    contenders, off_device = check_device(contenders, device, args.skip_unavailable)
    contenders, missing = check_available(contenders, device, args.engine, args.skip_unavailable)
    skipped = in_order(off_device + missing, args.contenders)
    prompts = load_prompts(args.prompts)
    choice = ModelChoice(args.model, args.preset, args.engine)
    check_choice(choice, contenders)
    width, height = size or default_size(choice)
    folders = prepare(choice, contenders, say)
    warn_other_source(folders.model_dir, folders.engine_dir)
    workload = Workload(
        prompts=prompts[: args.runs],
        negative_prompt=args.negative,
        width=width,
        height=height,
        steps=args.steps,
        guidance_scale=args.cfg,
        sampler=args.sampler,
        batch_size=args.batch,
        seed=args.seed,
    )
    return BenchConfig(
        model_dir=folders.model_dir,
        engine_dir=folders.engine_dir,
        model_label=folders.label,
        contenders=contenders,
        workload=workload,
        runs=args.runs,
        warmup=args.warmup,
        device=device,
        prompt_source=str(args.prompts) if args.prompts else "built-in",
        prewarm_files=not args.no_prewarm,
        psnr_reference=args.psnr_reference,
        skipped=skipped,
    )


def in_order(skipped: tuple[tuple[str, str], ...], contenders: str) -> tuple[tuple[str, str], ...]:
    """Skipped contenders in the order --contenders gives them."""
    from engine.bench.config import parse_contenders

    order = [c.name for c in parse_contenders(contenders)]
    return tuple(sorted(skipped, key=lambda item: order.index(item[0])))


def check_numbers(args: argparse.Namespace) -> None:
    from engine.bench.config import check_counts

    check_counts(args.runs, args.warmup, args.steps, args.batch)
    if not 0 <= args.cfg <= 100:
        raise ValueError(f"--cfg must be in [0, 100], got {args.cfg}")
    if not 0 <= args.seed <= MAX_SEED - args.batch + 1:
        raise ValueError(f"--seed must be in 0..{MAX_SEED - args.batch + 1}, got {args.seed}")


def warn_other_source(model_dir: Path, engine_dir: Path | None) -> None:
    """Same weights on every side: say so when the engine was exported from another folder."""
    if engine_dir is None:
        return
    from engine.manifest import read_manifest

    source = read_manifest(engine_dir).source.get("model_dir")
    if source and Path(source).resolve() != model_dir.resolve():
        say(f"warning: {engine_dir} was exported from {source}, not {model_dir}; check the PSNR column")


def default_name(report: dict[str, Any]) -> str:
    from engine.bench.machine import machine_kind

    config = report["config"]
    w = config["workload"]
    size = str(w["width"]) if w["width"] == w["height"] else f"{w['width']}x{w['height']}"
    kind = machine_kind(report["machine"], config["device"])
    return f"{kind}-{config['model']}-{size}-{report['created'][:10] or date.today().isoformat()}"


def output_stem(report: dict[str, Any], name: str | None) -> str:
    """A run's file name stem: ``--name``, else :func:`default_name`, which the report's first partial
    version already fixes (its machine, model, size and start date)."""
    return name or default_name(report)


def partial_path(report: dict[str, Any], out: Path, name: str | None) -> Path:
    """``OUT/STEM.partial.json``: where a run keeps its report so far."""
    return out / f"{output_stem(report, name)}{PARTIAL_SUFFIX}"


def save_partial(report: dict[str, Any], out: Path, name: str | None) -> None:
    """Write the report so far (``runner.measure``'s checkpoint). A write that fails is said in one
    line and the run goes on: the final files may still be written."""
    from engine.bench.writers import write_partial

    path = partial_path(report, out, name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_partial(report, path)
    except OSError as error:
        say(f"warning: cannot write the partial report {path}: {error}")


def write_outputs(reports: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from engine.bench.report import render_summary
    from engine.bench.writers import write_chart, write_csv, write_json, write_markdown

    if args.summary is not None:
        args.summary.write_text(render_summary(reports), encoding="utf-8")
        say(f"wrote {args.summary}")
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for index, report in enumerate(reports):
        stem = args.name if args.name and len(reports) == 1 else None
        stem = stem or (args.report[index].stem if args.report else default_name(report))
        written = [write_json(report, args.out / f"{stem}.json"), write_csv(report, args.out / f"{stem}.csv")]
        written.append(write_markdown(report, args.out / f"{stem}.md"))
        if args.chart:
            written.append(write_chart(report, args.out / f"{stem}.png"))
        if not args.report:  # a run that completed: its partial report has served
            partial_path(report, args.out, args.name).unlink(missing_ok=True)
        say("wrote " + ", ".join(str(p) for p in written))


def check_failures(reports: list[dict[str, Any]]) -> None:
    """EngineError (after the reports are out) naming every failed contender and failed PSNR reference
    run; skipped contenders and a partial report's contenders that did not run are not failures."""
    from engine.bench.runner import NOT_RUN

    problems = [
        str(r["config"]["psnr_reference_error"]) for r in reports if r["config"].get("psnr_reference_error")
    ]
    failed = [
        f"{name}: {entry.get('error', 'failed')}"
        for report in reports
        for name, entry in report["contenders"].items()
        if entry["status"] not in ("ok", "skipped", NOT_RUN)
    ]
    if failed:
        problems.append("contender failed: " + "; ".join(failed))
    if problems:
        raise EngineError("; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    """`bench` on its own: ``python benchmarks/run.py ARGS`` is ``sd-engine bench ARGS``."""
    parser = argparse.ArgumentParser(prog="sd-engine")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.run(args))
    except EngineError as error:
        print(f"sd-engine bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sd-engine bench: interrupted", file=sys.stderr)
        return 130
