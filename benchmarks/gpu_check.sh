#!/usr/bin/env bash
# GPU check (DESIGN §8): one command for a CUDA machine with torch and triton but no internet.
#
#     bash benchmarks/gpu_check.sh            # logs under $OUT/gpu_check when OUT is set
#
# Sections run in order; each writes its full log to $LOG_DIR/<section>.log and prints PASS/FAIL.
# Budget: under 8 minutes on one H200 (the section timeouts below add up to 7.8 minutes). The
# tables come last. Exit status: 0 when every section passed. TensorRT runs only if it is
# installed, onnxruntime's CUDA provider only if onnxruntime-gpu is; absent ones skip with the reason.
#
# Adding a section: `run_section <name> <timeout_s> <command...>`; a benchmark section also adds
# its log to TABLE_LOGS so that its markdown table is printed at the end.

set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
LOG_DIR="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the point is the compiled kernels
# ONNX graphs and TensorRT engines (hundreds of MB): fresh for this run, and not under $OUT.
export PACL_FAST_CACHE="${PACL_FAST_CACHE:-$(mktemp -d -t pacl-fast-cache.XXXXXX)}"
STATUS=0
TABLE_LOGS=()
START=$(date +%s)

run_section() {
    local name=$1 seconds=$2
    shift 2
    local log="$LOG_DIR/$name.log"
    echo
    echo "=== $name (timeout ${seconds}s) ==="
    echo "\$ $*" >"$log"
    local begin=$(date +%s)
    timeout "$seconds" "$@" >>"$log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - begin))
    if [ $rc -eq 0 ]; then
        echo "PASS $name (${took}s) -> $log"
        tail -n 3 "$log"
    else
        STATUS=1
        [ $rc -eq 124 ] && echo "FAIL $name: timed out after ${seconds}s -> $log" || echo "FAIL $name (exit $rc, ${took}s) -> $log"
        tail -n 40 "$log"
    fi
}

# ---- 0. environment ----------------------------------------------------------------------------
echo "=== environment ==="
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    "$PYTHON" - <<'PY'
import importlib, torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", device)
for name in ("triton", "open_clip", "onnxruntime", "tensorrt"):
    try:
        module = importlib.import_module(name)
        extra = f" providers {module.get_available_providers()}" if name == "onnxruntime" else ""
        print(name, module.__version__ + extra)
    except ImportError:
        print(name, "absent")
PY
} 2>&1 | tee "$LOG_DIR/environment.log"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "FAIL: CUDA is not available to torch; this check needs a GPU" | tee -a "$LOG_DIR/environment.log"
    exit 1
fi

# ---- 1. head kernels: CUDA parity (issue 4) ------------------------------------------------------
# tests marked `gpu`: the compiled upsample+argmax kernel (and the tiled path on CUDA tensors) on
# every random case of the CPU suite plus the 512x512 / 1024x2048 benchmark scale; the fused
# embedder + cosine kernels in fp32/fp16/bf16 (bf16 on tensor cores), both variants.
run_section head_parity 100 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider \
    tests/test_head_kernels.py tests/test_patch_similarity.py
if grep -qE "[0-9]+ skipped" "$LOG_DIR/head_parity.log"; then
    STATUS=1
    echo "FAIL head_parity: GPU tests were skipped on a GPU machine (reasons above / in the log)"
fi

# ---- 2. encoders: CUDA parity of every backend present (issues 5, 12) -----------------------------
# torch fp16/bf16, torch.compile fp16, onnxruntime (CUDA EP) fp32/fp16, TensorRT fp16/fp32 against
# the torch fp32 reference, tiny config and ViT-B-16 at 224 px (random init); then the four
# training-free last blocks (MaskCLIP, SCLIP, ClearCLIP, NACLIP) through torch / compile / TensorRT fp16.
run_section encoder_parity 130 "$PYTHON" -m pytest -q -rs -m "gpu and not slow" -p no:cacheprovider \
    tests/test_encoders.py tests/test_methods.py

# ---- 3. head benchmark on CUDA (issue 4) ---------------------------------------------------------
# reference vs tiled vs Triton for C in {21, 150, 171}, 512x512 and 1024x2048; then the embedder +
# cosine kernels (torch unfused vs fused vs cuBLAS + Triton epilogue), and which variant wins (the
# `embedder variant:` line: the Head's PACL_FAST_EMBEDDER_VARIANT switch waits for it).
run_section head_benchmark 70 "$PYTHON" -m benchmarks.head --device cuda --json "$LOG_DIR/head_cuda.json"
TABLE_LOGS+=("$LOG_DIR/head_benchmark.log")

# ---- 3b. text tower: full 77-token fp32 vs truncated, cold and warm disk cache (issue 15) ----------
run_section text 40 "$PYTHON" -m benchmarks.text --device cuda --json "$LOG_DIR/text_cuda.json"
TABLE_LOGS+=("$LOG_DIR/text.log")

# ---- 4. end-to-end throughput: ViT-B-16 at 448 px, batch 1/32/128, 150 classes (issues 5, 15) ------
# The naive peer against every encoder backend present x every head backend (random-init logits, and
# the scene-like logits rows), in one process so that compiles and the TensorRT engine (profile
# 1..128) are built once for the three batch sizes.
run_section throughput 130 "$PYTHON" -m benchmarks.throughput --device cuda --image-size 448 \
    --batch 1,32,128 --classes 150 --output-size 512x512 --warmup 2 --iters 8 --json "$LOG_DIR/throughput_448.json"
TABLE_LOGS+=("$LOG_DIR/throughput.log")

# ---- tables (last) -------------------------------------------------------------------------------
echo
echo "=== tables ==="
for log in "${TABLE_LOGS[@]}"; do
    echo "--- $(basename "$log" .log)"
    grep -E '^(machine|config|patch similarity|embedder variant|\|)' "$log" || echo "(no table: see $log)"
done
echo
echo "gpu_check: $([ $STATUS -eq 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - START))s; logs in $LOG_DIR"
exit $STATUS
