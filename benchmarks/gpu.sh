#!/usr/bin/env bash
# Check the GPU paths on any CUDA machine, in one command:
#
#   bash benchmarks/gpu.sh [--dry-run] [RESULTS_DIR]
#
# 1. installs what is missing and can be installed (tensorrt, cuda-python; best effort: a machine
#    without network goes on without them and the TensorRT contenders report themselves skipped);
# 2. makes the sd15 random-weight model and its ONNX engine folder (cached in $SD_ENGINE_GPU_WORK);
# 3. builds the TensorRT plans when tensorrt is importable (static profile, 512x512, batch 1);
# 4. runs the GPU and TensorRT tests (pytest -m "gpu or tensorrt");
# 5. runs `sd-engine bench --device cuda`: torch-cuda eager / graph / graph + fused CFG, ONNX Runtime
#    CUDA (IO binding; graph + fused CFG) and TensorRT (eager, graph, graph + fused CFG) against
#    diffusers fp16 eager, 512x512, $STEPS steps, CFG 7.5, batch 1, with PSNR against an fp32 CPU
#    reference image; contenders this machine cannot run are skipped with the reason.
# Everything (log, nvidia-smi, pip freeze, build log, pytest report, the bench's .json/.csv/.md) lands
# in RESULTS_DIR, default benchmarks/results/gpu-<gpu>-<date>. The script exits non-zero if the tests
# or the benchmark failed, after writing everything.
#
# --dry-run: no GPU needed; prints the steps and checks that `sd-engine bench` accepts the benchmark's
# contenders and flags (`sd-engine bench --dry-run`), then exits.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
WORK=${SD_ENGINE_GPU_WORK:-/tmp/sd-engine-gpu}
STEPS=${STEPS:-50}
RUNS=${RUNS:-3}
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
fi
MODEL=$WORK/sd15-model
ENGINE=$WORK/sd15-engine
CONTENDERS=diffusers:fp16
CONTENDERS+=,torch-cuda:eager+unfused,torch-cuda:graph+unfused,torch-cuda:graph+fused
CONTENDERS+=,onnxruntime:unfused,onnxruntime:graph+fused
CONTENDERS+=,tensorrt:eager+unfused,tensorrt:graph+unfused,tensorrt:graph+fused
BENCH=(--device cuda --contenders "$CONTENDERS" --size 512 --steps "$STEPS" --runs "$RUNS"
    --psnr-reference cpu-fp32 --skip-unavailable)

if [ "$DRY_RUN" -eq 1 ]; then
    echo "== dry run: would make $MODEL and $ENGINE, build TensorRT plans, run the GPU tests, then:"
    echo "sd-engine bench --model $MODEL --engine $ENGINE ${BENCH[*]} --out RESULTS_DIR"
    exec "$PYTHON" -m engine.cli bench --dry-run "${BENCH[@]}"
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU or driver on this machine (nvidia-smi failed)" >&2
    exit 2
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
OUT=${1:-benchmarks/results/gpu-${GPU}-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
echo "== sd-engine GPU check: results in $OUT"
nvidia-smi | tee "$OUT/nvidia-smi.txt"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: torch cannot see the GPU; install a CUDA build of torch" \
        "(see pytorch.org) on a machine with an NVIDIA driver" >&2
    exit 2
fi

has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
try_install() {  # try_install MODULE PIP-SPEC...
    local module=$1
    shift
    if has "$module"; then
        echo "have $module"
    elif "$PYTHON" -m pip install --quiet "$@"; then
        echo "installed $*"
    else
        echo "could not install $* (no network?): going on without it"
    fi
}
echo "== dependencies"
for module in diffusers transformers onnx onnxruntime polygraphy; do
    has "$module" || { echo "gpu.sh: $module is missing: pip install -e '.[export,dev]'" >&2; exit 2; }
done
try_install tensorrt "tensorrt>=10,<11"
has cuda.bindings || has cuda.cudart || try_install cuda "cuda-python>=12.6,<13"
if ! "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    echo "onnxruntime has no CUDA provider: the ONNX Runtime CUDA tests and contenders will skip" \
        "(pip uninstall onnxruntime && pip install onnxruntime-gpu to include them)"
fi
"$PYTHON" -m pip freeze >"$OUT/pip-freeze.txt" 2>/dev/null

echo "== model and engine folder in $WORK"
[ -f "$MODEL/model_index.json" ] || "$PYTHON" -m engine.cli init-random sd15 "$MODEL" || exit 1
[ -f "$ENGINE/manifest.json" ] || "$PYTHON" -m engine.cli export "$MODEL" "$ENGINE" || exit 1

if has tensorrt && { has cuda.bindings || has cuda.cudart; }; then
    echo "== TensorRT plans"
    # both UNets: the benchmark compares guidance on the host (unet) with fused guidance (unet_cfg)
    "$PYTHON" -m engine.cli build "$ENGINE" --profile static --size 512x512 --batch 1 \
        --networks text_encoder unet unet_cfg vae_decoder \
        --timing-cache "$WORK/timing.cache" 2>&1 | tee "$OUT/build.txt"
else
    echo "== TensorRT plans: skipped (tensorrt or cuda-python missing)" | tee "$OUT/build.txt"
fi

echo "== GPU tests"
"$PYTHON" -m pytest tests/backends/test_gpu.py tests/tensorrt/test_build_trt.py tests/backends/test_ort_iobinding.py \
    -m "gpu or tensorrt" -ra -p no:cacheprovider \
    --junitxml "$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.txt"
TESTS=${PIPESTATUS[0]}

echo "== benchmark"
"$PYTHON" -m engine.cli bench --model "$MODEL" --engine "$ENGINE" "${BENCH[@]}" --out "$OUT" --name bench
BENCH_STATUS=$?

echo "== done: tests exit $TESTS, benchmark exit $BENCH_STATUS; results in $OUT"
[ "$TESTS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
