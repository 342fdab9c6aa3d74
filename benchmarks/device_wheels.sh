#!/usr/bin/env bash
# Wheels the GPU check needs that the lent GPU machine lacks (issue 21), downloaded here, pinned.
#
#     bash benchmarks/device_wheels.sh                       # -> .whl/ for the lent machine (CPython 3.12)
#     bash benchmarks/device_wheels.sh --python 3.11 --dest DIR   # the same set for this machine's dry run
#
# The lent machine is offline, with its own Python 3.12, torch 2.11, triton 3.6, numpy, pillow, onnx,
# onnxruntime, safetensors, timm, huggingface-hub, regex, tqdm, pyyaml, httpx, anyio, h11, click,
# opencv-python-headless, pytest, pytest-benchmark, prometheus-client (benchmarks/machine_site.py holds
# its whole list). What pacl-fast's GPU check imports beyond that is below, each pinned to the version
# this project is tested with. `gpu_check.sh` installs them with `pip install --no-index --no-deps
# --target`, so every dependency a wheel needs that the machine lacks must be listed here too.
# The wheels travel with the working tree (at most 64 MiB in all): this set must stay under 40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=3.12
DEST=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYTHON_VERSION=$2; shift 2 ;;
        --dest) DEST=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "device_wheels.sh: unknown argument $1 (expected --python X.Y, --dest DIR)" >&2; exit 2 ;;
    esac
done

WHEELS=(
    # the model: open_clip and its text cleaning (regex, timm, huggingface-hub are on the machine)
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5
    # the service: FastAPI and uvicorn (click and h11 are on the machine)
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing_extensions==4.16.0 annotated-doc==0.0.7 anyio==4.16.0 sniffio==1.3.1
    opentelemetry-api==1.45.3
    uvicorn==0.55.0 python-multipart==0.0.34
    # training data: WebDataset shards (pyyaml is on the machine)
    webdataset==1.0.2 braceexpand==0.1.7
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PY_TAG="cp${PYTHON_VERSION/./}"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --abi "$PY_TAG" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

count=$(ls "$DEST"/*.whl | wc -l)
bytes=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
mib=$(awk "BEGIN {printf \"%.1f\", $bytes / 1048576}")
echo "device_wheels: $count wheels for CPython $PYTHON_VERSION in $DEST, $mib MiB"
if [ "$count" -ne "${#WHEELS[@]}" ]; then
    echo "device_wheels: expected ${#WHEELS[@]} wheels, got $count" >&2
    exit 1
fi
if [ "$bytes" -gt $((40 * 1048576)) ]; then
    echo "device_wheels: over the 40 MiB budget (the working tree travels in the same 64 MiB)" >&2
    exit 1
fi
