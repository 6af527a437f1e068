#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage_* functions are called by name, through run_stage
# The GPU check in one command, for an air-gapped CUDA machine with a fixed image and a short slot.
#
#   bash benchmarks/gpu.sh [--dry-run] [--stages LIST] [--wheels DIR] [--work DIR] [--deadline S]
#                          [--archive FILE.tar.gz] [RESULTS_DIR]
#   bash benchmarks/gpu.sh --download-wheels [DIR]      # on a machine with network, before the slot
#
# Stages, in order (--stages takes a comma-separated subset; default all):
#   setup   a fresh virtual environment that sees the image's packages, the carried wheels installed
#           into it with no index and no dependencies, the project installed without dependencies,
#           the environment recorded (versions, GPU, skip lines for TensorRT and ONNX Runtime CUDA)
#   plan    what the benchmark will run and skip (`sd-engine bench --dry-run`), before anything is built
#   model   the sd15 random-weight model and its engine folder (torch-only: seconds; the ONNX export
#           runs only when TensorRT or onnxruntime-gpu can use it), cached in the work folder
#   smoke   one short torch-cuda generation at 512x512: fails in seconds if the basics are broken
#   tests   pytest -m "gpu or tensorrt" over tests/backends and tests/tensorrt
#   bench   `sd-engine bench --device cuda`: diffusers fp16 eager, torch-cuda eager, with the UNet in a
#           CUDA graph, with fused guidance, with torch.compile inside the graph (then ONNX Runtime
#           CUDA and TensorRT where present, else a skip line each), 512x512, 50 steps, CFG 7.5,
#           batch 1, PSNR of each first image against diffusers fp32 on the same GPU
# Every stage has a time cap inside the overall deadline (--deadline, default 480 s; 1500 s for the
# dry run), the stages before the benchmark leave it $BENCH_RESERVE seconds (default 240), and each
# stage ends with a status line; a failed or timed-out stage does not stop the stages after it. Everything lands in RESULTS_DIR (default
# benchmarks/results/gpu-GPU-DATE): log.txt, stages.tsv, summary.md, env.json, pip-list.txt,
# nvidia-smi.txt, smoke.png, pytest.txt, pytest.xml, bench.json/.csv/.md. Exit status: 0 when every
# stage run passed. --archive also packs the results folder into one file (what a slot hands back).
#
# --dry-run: the same stages on the CPU, at the tiny preset, with the same wheel-only install into a
# fresh virtual environment: the torch contenders run on the CPU (torch eager, fused, torch.compile)
# and every CUDA contender prints its skip line. Proves the script before a GPU slot is spent.
#
# Wheels: the image lacks diffusers (and its importlib_metadata); benchmarks/gpu-wheels.txt pins
# them. `--download-wheels [DIR]` runs the one-line download into .whl/ (ignored by git; 6.4 MB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
#     -d .whl -r benchmarks/gpu-wheels.txt
# Copy .whl/ beside the tree to the GPU machine (a tool that copies only tracked files must be told
# to take it). On a real run without them, setup stops the check if diffusers is missing.
# Hand-back: a slot that returns only a few files wants `--archive FILE.tar.gz` (one file) and a
# RESULTS_DIR outside the copied tree.
#
# Environment: PYTHON (default python3: the image's, with torch), STEPS, RUNS (50 and 3 on the GPU,
# 4 and 1 in the dry run), BENCH_RESERVE (240), SD_ENGINE_GPU_WORK (the --work default,
# /tmp/sd-engine-gpu: the venv, the model and the engine folder, reused across runs; one run at a time).
# Relative paths are taken from where the command runs. RESULTS_DIR must be new or empty.
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PYTHON=${PYTHON:-python3}
DRY_RUN=0
STAGES=setup,plan,model,smoke,tests,bench
WHEELS=$ROOT/.whl
WORK=${SD_ENGINE_GPU_WORK:-/tmp/sd-engine-gpu}
DEADLINE=${DEADLINE:-}
OUT=
ARCHIVE=
ALL_STAGES=(setup plan model smoke tests bench)

usage() { sed -n '3,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: $*" >&2; exit 2; }
absolute() { case $1 in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # from where it was run

download_wheels() {  # download_wheels DIR: the one-line download, on a machine with network
    local dir=${1:-$ROOT/.whl}
    mkdir -p "$dir" || die "cannot make $dir"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
        -d "$dir" -r "$ROOT/benchmarks/gpu-wheels.txt" || exit 1
    ls -l "$dir"
}

while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --stages) { [ $# -ge 2 ] && [ -n "$2" ]; } || die "--stages needs a list, e.g. setup,model"; STAGES=$2; shift ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$(absolute "$2"); shift ;;
        --work) [ $# -ge 2 ] || die "--work needs a folder"; WORK=$(absolute "$2"); shift ;;
        --deadline) [ $# -ge 2 ] || die "--deadline needs seconds"; DEADLINE=$2; shift ;;
        --archive) [ $# -ge 2 ] || die "--archive needs a file name"; ARCHIVE=$(absolute "$2"); shift ;;
        --download-wheels)
            [ $# -le 2 ] || die "--download-wheels takes one folder at most and no other option"
            [ $# -lt 2 ] || [[ $2 != -* ]] || die "--download-wheels takes one folder at most and no other option"
            download_wheels "$([ $# -eq 2 ] && absolute "$2")"
            exit 0 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$OUT" ] || die "one RESULTS_DIR only, got $OUT and $1"; OUT=$(absolute "$1") ;;
    esac
    shift
done
# the slot: 8 minutes on the GPU; the dry run on 2 CPU cores is slower (torch.compile on the CPU)
[ -n "$DEADLINE" ] || DEADLINE=$([ "$DRY_RUN" -eq 1 ] && echo 1500 || echo 480)
BENCH_RESERVE=${BENCH_RESERVE:-240}  # seconds the stages before the benchmark leave it
{ [[ $DEADLINE =~ ^[0-9]+$ ]] && [ "$DEADLINE" -gt 0 ]; } || die "--deadline must be whole seconds above 0, got $DEADLINE"
IFS=, read -r -a SELECTED <<<"$STAGES"
for stage in "${SELECTED[@]}"; do
    [[ " ${ALL_STAGES[*]} " == *" $stage "* ]] || die "unknown stage '$stage'; stages: ${ALL_STAGES[*]}"
done
selected() { [[ ",$STAGES," == *",$1,"* ]]; }

GPU_CONTENDERS=diffusers:fp16,torch-cuda:eager+unfused,torch-cuda:graph+unfused,torch-cuda:graph+fused
GPU_CONTENDERS+=,torch-cuda:graph+fused+compile,onnxruntime:graph+fused,tensorrt:graph+fused
# the dry run: the torch contenders on the CPU first (the baseline must run), then every GPU one (skips)
CPU_CONTENDERS=diffusers,torch:unfused,torch:fused,torch:fused+compile,$GPU_CONTENDERS
if [ "$DRY_RUN" -eq 1 ]; then
    PRESET=tiny SIZE=64 STEPS=${STEPS:-4} RUNS=${RUNS:-1} DEVICE=cpu BACKEND=torch REFERENCE=cpu-fp32
    CONTENDERS=$CPU_CONTENDERS
    DEFAULT_OUT=${TMPDIR:-/tmp}/sd-engine-gpu-dry-run-$(date +%Y%m%d-%H%M%S)
else
    PRESET=sd15 SIZE=512 STEPS=${STEPS:-50} RUNS=${RUNS:-3} DEVICE=cuda BACKEND=torch-cuda REFERENCE=cuda-fp32
    CONTENDERS=$GPU_CONTENDERS
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
        die "no NVIDIA GPU or driver on this machine (nvidia-smi failed); --dry-run checks the script on a CPU"
    fi
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
    DEFAULT_OUT=$ROOT/benchmarks/results/gpu-$GPU-$(date +%Y%m%d-%H%M%S)
fi
OUT=${OUT:-$DEFAULT_OUT}
[ ! -e "$WORK" ] || [ -d "$WORK" ] || die "--work must be a folder, got the file $WORK"
[ ! -e "$OUT" ] || [ -d "$OUT" ] || die "RESULTS_DIR must be a folder, got the file $OUT"
[ ! -d "$OUT" ] || [ -z "$(ls -A "$OUT")" ] ||
    die "RESULTS_DIR $OUT is not empty: give a new folder (the default is a dated one)"
{ mkdir -p "$WORK" 2>/dev/null && [ -w "$WORK" ]; } || die "cannot write to the work folder $WORK"
{ mkdir -p "$OUT" 2>/dev/null && [ -w "$OUT" ] && touch "$OUT/log.txt" 2>/dev/null; } ||
    die "cannot write to the results folder $OUT"
if [ -n "$ARCHIVE" ]; then
    { [ -d "$(dirname "$ARCHIVE")" ] && [ -w "$(dirname "$ARCHIVE")" ]; } || die "cannot write the archive $ARCHIVE"
fi
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
exec 9>"$WORK/.lock"
flock -n 9 || die "another gpu.sh is using the work folder $WORK: wait for it, or give --work another folder"
VENV=$WORK/venv
VPY=$VENV/bin/python
SD_ENGINE=$VENV/bin/sd-engine
MODEL=$WORK/$PRESET-model
ENGINE=$WORK/$PRESET-engine
STAGE_FILE=$OUT/stages.tsv
START=$SECONDS
# the log keeps going through Ctrl-C (tee ignores it): the summary of an interrupted run lands too
exec > >(trap '' INT TERM; exec tee -a "$OUT/log.txt") 2>&1
CHILD=
INTERRUPTED=0
DEATH_SIGNAL=()
setpriv --pdeathsig TERM true 2>/dev/null && DEATH_SIGNAL=(setpriv --pdeathsig TERM)
on_signal() {  # stop the running command (its own process group, under timeout), then the stages
    INTERRUPTED=1
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
}
trap on_signal INT TERM
echo "== sd-engine GPU check$([ "$DRY_RUN" -eq 1 ] && echo ' (dry run on the CPU)'): stages $STAGES," \
    "deadline ${DEADLINE} s, results in $OUT"
printf 'stage\tstatus\tseconds\n' >"$STAGE_FILE"

left() { echo $((DEADLINE - (SECONDS - START))); }

# run_stage NAME CAP [RESERVE]: run stage_NAME with a time cap of min(CAP, time left - RESERVE),
# record its status
run_stage() {
    local name=$1 cap=$2 reserve=${3:-0} limit status began=$SECONDS
    limit=$(($(left) - reserve))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped: only $(left) s of the ${DEADLINE} s deadline left"
        printf '%s\tskipped (out of time)\t0\n' "$name" >>"$STAGE_FILE"
        return 1
    fi
    echo "== $name (at most $limit s; $(left) s left)"
    STAGE_END=$((SECONDS + limit)) "stage_$name"
    status=$?
    local took=$((SECONDS - began)) word=ok
    if [ "$INTERRUPTED" -eq 1 ]; then
        word=interrupted
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        word="timed out after $limit s"
    elif [ "$status" -ne 0 ]; then
        word="failed (exit $status)"
    fi
    echo "== $name: $word in $took s"
    printf '%s\t%s\t%s\n' "$name" "$word" "$took" >>"$STAGE_FILE"
    return "$status"
}

capped() {  # inside a stage: a command under what is left of the stage's cap (exit 124 past it)
    local rest=$((STAGE_END - SECONDS)) status
    [ "$INTERRUPTED" -eq 0 ] || return 130
    [ "$rest" -ge 1 ] || return 124
    # timeout runs the command in its own process group (so a time-out stops all of it); with
    # setpriv's parent-death signal it also stops when this script dies, even by kill -9; the lock's
    # descriptor stays here (9>&-), so nothing left over holds the work folder
    "${DEATH_SIGNAL[@]}" timeout --kill-after=10 "$rest" "$@" </dev/null 9>&- &
    CHILD=$!
    wait "$CHILD"
    status=$?
    while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; status=$?; done  # a signal cut the first wait short
    CHILD=
    return "$status"
}

image_paths() {  # the launcher's import path without the standard library and the source tree
    "$PYTHON" - "$ROOT" <<'EOF'
import os, sys, sysconfig
root = os.path.realpath(sys.argv[1])
std = {os.path.realpath(sysconfig.get_path(k)) for k in ("stdlib", "platstdlib")}
std |= {os.path.join(s, "lib-dynload") for s in std}
for path in sys.path:
    real = os.path.realpath(path) if path else ""
    if path and os.path.isdir(path) and real != root and real not in std:
        print(path)
EOF
}

stage_setup() {
    rm -rf "$VENV" "$WORK/src" "$WORK/env.sh"
    # A venv made from a venv sees the base interpreter's packages, not the image's: a .pth file
    # puts the image's import path after the venv's own site-packages, so carried wheels win.
    "$PYTHON" -m venv --without-pip "$VENV" || { echo "could not make a virtual environment in $VENV"; return 1; }
    local site
    site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || return 1
    image_paths >"$site/_sd_engine_image.pth" || return 1
    echo "fresh virtual environment $VENV ($("$VPY" -V)); the image's packages after its own"
    local wheels=()
    [ -d "$WHEELS" ] && mapfile -t wheels < <(find "$WHEELS" -maxdepth 1 -type f -name '*.whl' | sort)
    if [ "${#wheels[@]}" -eq 0 ] && [ "$DRY_RUN" -eq 1 ]; then
        echo "no wheels in $WHEELS: the dry run proves the wheel-only install, so it needs them" \
            "(bash benchmarks/gpu.sh --download-wheels, or --wheels DIR)"
        return 1
    fi
    if [ "${#wheels[@]}" -gt 0 ]; then
        echo "carried wheels (installed with no index, no dependencies):"
        du -h "${wheels[@]}" | sed 's/^/  /'
    else
        echo "no wheels in $WHEELS: using the image's packages alone" \
            "(bash benchmarks/gpu.sh --download-wheels fills it where there is network)"
    fi
    echo "installing them and sd-engine from $ROOT (built with the image's setuptools), without dependencies"
    # built from a copy: the build leaves nothing in the tree, and nothing stale from it goes in
    { mkdir -p "$WORK/src" && tar -C "$ROOT" --exclude=__pycache__ -cf - pyproject.toml README.md engine |
        tar -C "$WORK/src" -xf -; } || { echo "could not copy the source to $WORK/src"; return 1; }
    # the image's pip, run by the venv's python, installs into the venv (scripts in its bin/);
    # --ignore-installed: what the image has of the same name stays, the venv's copy comes first
    PIP_ROOT_USER_ACTION=ignore capped "$VPY" -m pip install --disable-pip-version-check --no-index \
        --no-deps --ignore-installed --no-build-isolation --no-compile -q "${wheels[@]}" "$WORK/src" ||
        { echo "installing the carried wheels and the project failed"; return 1; }
    "$VPY" -m pip list --disable-pip-version-check --path "$site" 2>/dev/null >"$OUT/venv-packages.txt"
    "$VPY" -m pip list --disable-pip-version-check 2>/dev/null >"$OUT/pip-list.txt"
    if [ "$DRY_RUN" -eq 0 ]; then nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; fi
    capped "$VPY" "$ROOT/benchmarks/gpu_env.py" --device "$DEVICE" --site "$site" --wheels "$WHEELS" \
        --json "$OUT/env.json" --shell "$WORK/env.sh"
}

# bench_args DEVICE CONTENDERS SIZE STEPS RUNS REFERENCE: the benchmark's arguments, into ARGS
bench_args() {
    ARGS=(--model "$MODEL" --engine "$ENGINE" --device "$1" --contenders "$2" --size "$3" --steps "$4"
        --runs "$5" --warmup 1 --cfg 7.5 --batch 1 --psnr-reference "$6" --skip-unavailable)
}

stage_plan() {  # what the benchmark will run and skip, from `sd-engine bench --dry-run` (no model needed)
    local cli=("$PYTHON" -m engine.cli)  # before setup: the source tree
    [ -x "$SD_ENGINE" ] && cli=("$SD_ENGINE")
    bench_args "$DEVICE" "$CONTENDERS" "$SIZE" "$STEPS" "$RUNS" "$REFERENCE"
    echo "sd-engine bench ${ARGS[*]} --out $OUT --name bench"
    capped "${cli[@]}" bench --dry-run "${ARGS[@]}" || return 1
    if [ "$DRY_RUN" -eq 1 ]; then  # and the GPU run's plan, as far as this machine can tell
        bench_args cuda "$GPU_CONTENDERS" 512 50 3 cuda-fp32
        echo "on a GPU: sd-engine bench ${ARGS[*]}"
        capped "${cli[@]}" bench --dry-run "${ARGS[@]}" || return 1
    fi
}

needs_setup() {  # the venv and sd-engine in it, or a line saying to run setup first
    [ -x "$SD_ENGINE" ] || { echo "no sd-engine in $VENV: run the setup stage first"; return 1; }
}

stage_model() {
    needs_setup || return 1
    rm -rf "$WORK"/.*.tmp-*  # staging folders of a run that was killed (this run holds the lock)
    # shellcheck source=/dev/null
    [ -f "$WORK/env.sh" ] && . "$WORK/env.sh"
    if [ ! -f "$MODEL/model_index.json" ]; then
        capped "$SD_ENGINE" init-random "$PRESET" "$MODEL" --overwrite || return 1
    fi
    local want=torch-only have=none
    [ "${ONNX_NEEDED:-0}" -eq 1 ] && want=onnx
    [ -f "$ENGINE/.gpu-check-$want" ] && have=$want
    if [ "$have" != "$want" ]; then
        local flags=(--overwrite)
        [ "$want" = torch-only ] && flags+=(--torch-only)
        echo "engine folder: $want ($([ "$want" = onnx ] && echo 'TensorRT or onnxruntime-gpu can use the ONNX graphs' \
            || echo 'no TensorRT, no onnxruntime-gpu: the torch backends need no ONNX'))"
        capped "$SD_ENGINE" export "$MODEL" "$ENGINE" "${flags[@]}" || return 1
        touch "$ENGINE/.gpu-check-$want"
    else
        echo "engine folder $ENGINE ($want) reused"
    fi
    if [ "${HAVE_TENSORRT:-0}" -eq 1 ]; then
        echo "TensorRT plans: static 512x512 batch 1, both UNets"
        capped "$SD_ENGINE" build "$ENGINE" --profile static --size "${SIZE}x${SIZE}" --batch 1 \
            --networks text_encoder unet unet_cfg vae_decoder --timing-cache "$WORK/timing.cache" || return 1
    else
        echo "TensorRT plans: skipped: ${TENSORRT_REASON:-tensorrt is not installed}"
    fi
}

stage_smoke() {
    needs_setup || return 1
    [ -f "$ENGINE/manifest.json" ] || { echo "no engine folder: run the model stage first"; return 1; }
    capped "$SD_ENGINE" generate "$ENGINE" "a lighthouse on a cliff at dusk" --backend "$BACKEND" \
        --steps 4 --size "${SIZE}x${SIZE}" --seed 1 -o "$OUT/smoke.png" || return 1
    [ -s "$OUT/smoke.png" ] || { echo "the smoke run wrote no image"; return 1; }
}

stage_tests() {
    local status
    needs_setup || return 1
    capped "$VPY" -m pytest tests/backends tests/tensorrt -m "gpu or tensorrt" -ra -p no:cacheprovider \
        --junitxml "$OUT/pytest.xml" >"$OUT/pytest.txt" 2>&1
    status=$?
    cat "$OUT/pytest.txt"
    [ "$status" -eq 5 ] && { echo "pytest selected no GPU test"; return 1; }
    [ "$status" -eq 0 ] || return "$status"
    if ! grep -qE '[0-9]+ passed' "$OUT/pytest.txt"; then
        [ "$DRY_RUN" -eq 1 ] && { echo "dry run: every GPU test skips on the CPU, as it should"; return 0; }
        echo "no GPU test ran: every one skipped (the reasons are in pytest.txt)"
        return 1
    fi
}

stage_bench() {
    needs_setup || return 1
    [ -f "$ENGINE/manifest.json" ] || { echo "no engine folder: run the model stage first"; return 1; }
    bench_args "$DEVICE" "$CONTENDERS" "$SIZE" "$STEPS" "$RUNS" "$REFERENCE"
    capped "$SD_ENGINE" bench "${ARGS[@]}" --out "$OUT" --name bench
}

FAILED=0
for stage in "${ALL_STAGES[@]}"; do
    selected "$stage" || continue
    reserve=0
    selected bench && [ "$stage" != bench ] && reserve=$BENCH_RESERVE
    case $stage in
        setup) cap=150 ;; plan) cap=60 ;; model) cap=240 ;; smoke) cap=90 ;; tests) cap=180 ;; bench) cap=1200 ;;
    esac
    run_stage "$stage" "$cap" "$reserve" || FAILED=1
    STOPPED=
    if [ "$INTERRUPTED" -eq 1 ]; then
        STOPPED="interrupted during $stage"
    elif [ "$stage" = setup ] && [ "$FAILED" -eq 1 ]; then
        STOPPED="setup failed: every later stage runs in its environment"
    fi
    if [ -n "$STOPPED" ]; then
        echo "== $STOPPED: the stages after it do not run"
        after=0
        for rest in "${ALL_STAGES[@]}"; do
            [ "$after" -eq 1 ] && selected "$rest" && printf '%s\tnot run (%s)\t0\n' "$rest" "$STOPPED" >>"$STAGE_FILE"
            [ "$rest" = "$stage" ] && after=1
        done
        break
    fi
done
if [ -x "$VPY" ] || [ -n "$(command -v "$PYTHON")" ]; then
    "$PYTHON" "$ROOT/benchmarks/gpu_summary.py" "$OUT" >"$OUT/summary.md" && cat "$OUT/summary.md"
fi
if [ "$INTERRUPTED" -eq 1 ]; then
    echo "== interrupted after $((SECONDS - START)) s; results so far in $OUT"
else
    echo "== done in $((SECONDS - START)) s: $([ "$FAILED" -eq 0 ] && echo 'every stage passed' || echo 'a stage failed');" \
        "results in $OUT"
fi
if [ -n "$ARCHIVE" ]; then  # last, so the archived log holds the verdict above
    if tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"; then
        echo "== packed $OUT into $ARCHIVE"
    else
        echo "== could not pack $OUT into $ARCHIVE"
        FAILED=1
    fi
fi
[ "$INTERRUPTED" -eq 1 ] && exit 130
exit "$FAILED"
