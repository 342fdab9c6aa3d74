#!/usr/bin/env bash
# GPU check (DESIGN §8): one command for a CUDA machine with torch and triton, no internet.
#
#   bash benchmarks/gpu_check.sh            # logs under $OUT when set, else ./gpu_check_logs
#
# Sections run in order; each has a time limit, logs to its own file, and adds a line to the
# summary table printed last. Budget: the whole script under 8 minutes on one H200.
# TensorRT runs only if it is installed; onnxruntime's CUDA provider only if onnxruntime-gpu is.
set -u -o pipefail
cd "$(dirname "$0")/.."

LOG_DIR="${OUT:-./gpu_check_logs}"
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# ONNX graphs and TensorRT engines (hundreds of MB): fresh for this run, and not under $OUT.
export PACL_FAST_CACHE="${PACL_FAST_CACHE:-$(mktemp -d -t pacl-fast-cache.XXXXXX)}"
PYTHON="${PYTHON:-python}"
SUMMARY="$LOG_DIR/summary.md"
echo "| section | result | seconds | log |" > "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"

# run NAME LIMIT_S COMMAND...: run COMMAND with a time limit, log it, record the outcome.
run() {
  local name="$1" limit="$2"; shift 2
  local log="$LOG_DIR/$name.log" start end status result
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  end=$(date +%s)
  case "$status" in
    0) result="ok" ;;
    124|130) result="TIMED OUT" ;;
    *) result="FAILED (exit $status)" ;;
  esac
  echo "| $name | $result | $((end - start)) | $log |" >> "$SUMMARY"
}

# --- machine -------------------------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PYTHON" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("triton", "open_clip", "onnxruntime", "tensorrt"):
    try:
        module = importlib.import_module(name)
        extra = f" providers {module.get_available_providers()}" if name == "onnxruntime" else ""
        print(name, module.__version__ + extra)
    except ImportError:
        print(name, "absent")
PY
} 2>&1 | tee "$LOG_DIR/machine.log"

# === encoders: CUDA parity of every backend present ================================================
# torch fp16/bf16, torch.compile fp16, onnxruntime (CUDA EP) fp32/fp16, TensorRT fp16/fp32 against
# the torch fp32 reference, tiny config and ViT-B-16 at 224 px (random init). Absent ones skip with
# the reason (-rs lists them).
run encoders-parity 180 "$PYTHON" -m pytest tests/test_encoders.py -m "gpu and not slow" -q -rs -p no:cacheprovider

# === encoders: throughput, ViT-B-16 at 448 px, batch 1/32/128, 150 classes ========================
# Naive peer against every encoder backend present x every head backend; one process so that
# compiles and the TensorRT engine (profile 1..128) are built once for the three batch sizes.
run encoders-throughput 270 "$PYTHON" -m benchmarks.throughput --device cuda --image-size 448 \
  --batch 1,32,128 --classes 150 --output-size 512x512 --warmup 2 --iters 10 \
  --json "$LOG_DIR/throughput_448.json"

# --- summary (last) ------------------------------------------------------------------------------
echo
echo "logs: $LOG_DIR"
if [ -f "$LOG_DIR/encoders-throughput.log" ]; then
  echo
  echo "encoders throughput (ViT-B-16, 448 px, 150 classes, 512x512):"
  grep '^|' "$LOG_DIR/encoders-throughput.log" || true
fi
echo
cat "$SUMMARY"
