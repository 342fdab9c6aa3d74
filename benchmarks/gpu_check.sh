#!/usr/bin/env bash
# GPU check (DESIGN §8): one command for a CUDA machine with torch and triton but no internet.
#
#     bash benchmarks/gpu_check.sh            # logs under $OUT/gpu_check when OUT is set
#
# Sections run in order; each writes its full log to $LOG_DIR/<section>.log and prints PASS/FAIL.
# Budget: under 8 minutes on one H200 (each section has its own timeout below). The tables come
# last. Exit status: 0 when every section passed.
#
# Adding a section (e.g. issue 5: encoder parity and throughput): put it in the numbered slot
# below with `run_section <name> <timeout_s> <command...>`; a benchmark section should also add
# its log to TABLE_LOGS so that its markdown table is printed at the end.

set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
LOG_DIR="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # the point is the compiled kernels
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
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee "$LOG_DIR/environment.log"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "FAIL: CUDA is not available to torch; this check needs a GPU" | tee -a "$LOG_DIR/environment.log"
    exit 1
fi

# ---- 1. head kernels: CUDA parity (issue 4) ------------------------------------------------------
# tests marked `gpu`: the compiled upsample+argmax kernel (and the tiled path on CUDA tensors) on
# every random case of the CPU suite plus the 512x512 / 1024x2048 benchmark scale; the fused
# embedder + cosine kernels in fp32/fp16/bf16 (bf16 on tensor cores), both variants.
run_section head_parity 300 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider \
    tests/test_head_kernels.py tests/test_patch_similarity.py
if grep -qE "[0-9]+ skipped" "$LOG_DIR/head_parity.log"; then
    STATUS=1
    echo "FAIL head_parity: GPU tests were skipped on a GPU machine (reasons above / in the log)"
fi

# ---- 2. encoders: CUDA parity (issue 5 adds this section) ----------------------------------------

# ---- 3. head benchmark on CUDA (issue 4) ---------------------------------------------------------
# reference vs tiled vs Triton for C in {21, 150, 171}, 512x512 and 1024x2048; then the embedder +
# cosine kernels (torch unfused vs fused vs cuBLAS + Triton epilogue).
run_section head_benchmark 150 "$PYTHON" -m benchmarks.head --device cuda --json "$LOG_DIR/head_cuda.json"
TABLE_LOGS+=("$LOG_DIR/head_benchmark.log")

# ---- 4. encoder throughput (issue 5 adds this section) -------------------------------------------

# ---- tables (last) -------------------------------------------------------------------------------
echo
echo "=== tables ==="
for log in "${TABLE_LOGS[@]}"; do
    echo "--- $(basename "$log" .log)"
    grep -E '^(machine|config|patch similarity|\|)' "$log" || echo "(no table: see $log)"
done
echo
echo "gpu_check: $([ $STATUS -eq 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - START))s; logs in $LOG_DIR"
exit $STATUS
