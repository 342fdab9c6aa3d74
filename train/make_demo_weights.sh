#!/usr/bin/env bash
# Reproduce the demo weights shipped in pacl_fast/assets/demo: a CLIP trained from scratch on the
# synthetic world (open_clip's own classes, train/configs/synthetic_clip.json), then PACL on top
# of it, then the quality table of the README. About 50 minutes of training on 2 CPU cores.
#
#     bash train/make_demo_weights.sh [RUN_DIR]     # default runs/demo
#
# Killed? Run it again: each stage resumes from its last checkpoint (--resume auto).
# THREADS=1 is faster than torch's default when other jobs share the cores (OpenMP spin-waits).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/demo}"
ASSETS=pacl_fast/assets/demo
PYTHON="${PYTHON:-python}"
THREADS_FLAG=()
[ -n "${THREADS:-}" ] && THREADS_FLAG=(--threads "$THREADS")

"$PYTHON" train/train.py --stage clip --clip-config train/configs/synthetic_clip.json --out "$RUN/clip" \
    --steps 2000 --batch-size 128 --lr 1e-3 --warmup 100 --save-every 250 --workers 1 \
    --export-dtype float16 "${THREADS_FLAG[@]}"
# PACL is trained against the very file that ships (its metadata pins the CLIP by sha256).
mkdir -p "$ASSETS"
rm -rf "$ASSETS/clip"
cp -r "$RUN/clip/export" "$ASSETS/clip"
"$PYTHON" train/train.py --stage pacl --clip "local-dir:$ASSETS/clip" --out "$RUN/pacl" \
    --steps 3000 --batch-size 128 --lr 2e-3 --embedder-hidden 512 --warmup 100 --save-every 500 --workers 1 \
    "${THREADS_FLAG[@]}"
cp "$RUN/pacl/pacl.safetensors" "$ASSETS/pacl.safetensors"
# The measured background threshold (pacl_fast/defaults.py says how), so every door paints background as such.
"$PYTHON" -c "import sys, pacl_fast.defaults as d; d.record_defaults(sys.argv[1], background_threshold=d.DEMO_BACKGROUND_THRESHOLD)" \
    "$ASSETS/pacl.safetensors"
chmod 644 "$ASSETS/pacl.safetensors" "$ASSETS"/clip/*
"$PYTHON" -m benchmarks.synthetic_quality --clip "local-dir:$ASSETS/clip" --pacl-weights "$ASSETS/pacl.safetensors" \
    --probe-steps 4000 --json benchmarks/results/synthetic_quality.json
