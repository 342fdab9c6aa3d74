"""An interpreter that sees only what the lent GPU machine has, for ``gpu_check.sh --dry-run`` (issue 21).

The lent machine is offline and bare: its own Python, torch and triton, the packages in
:data:`MACHINE_PACKAGES`, and whatever wheels travel in ``.whl/``. A dry run on the development
machine must fail where the lent machine would (an import of a package it lacks, a wheel missing from
``device_wheels.sh``), so it runs in a fresh virtual environment built on the base interpreter (not the
development venv) whose only third-party packages are links to the distributions of that list that are
installed here (torch and triton included). Nothing else of this machine's site-packages is visible.

    python -m benchmarks.machine_site DIR      # prints DIR/venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: The lent machine's packages ('cuda' image, read 2026-11-17; /work/.library/device/KINDS.md), less the
#: ones that only a GPU build ships under other names here.
MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()  # noqa: SIM905 (the list as the machine page prints it)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_entries(distribution: metadata.Distribution) -> set[Path]:
    """The files and folders directly in site-packages that ``distribution`` installed (its dist-info too)."""
    root = Path(distribution.locate_file(""))
    entries = set()
    for file in distribution.files or ():
        parts = Path(file).parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
            continue
        entries.add(root / parts[0])
    return {entry for entry in entries if entry.exists()}


def build(folder: Path) -> Path:
    """``folder/venv``: a venv on the base interpreter whose site-packages links the machine's packages."""
    allowed = {normalise(name) for name in MACHINE_PACKAGES}
    links = folder / "machine-packages"
    links.mkdir(parents=True, exist_ok=True)
    linked = []
    for distribution in metadata.distributions():
        name = normalise(distribution.metadata["Name"] or "")
        if name not in allowed:
            continue
        for entry in top_level_entries(distribution):
            target = links / entry.name
            if not target.exists():
                target.symlink_to(entry)
        linked.append(name)
    base = getattr(sys, "_base_executable", sys.executable)
    venv = folder / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "machine-packages.pth").write_text(f"{links}\n", encoding="utf-8")
    missing = sorted({"torch", "triton", "numpy", "pillow", "safetensors"} - set(linked))
    if missing:
        raise SystemExit(f"machine_site: {', '.join(missing)} not installed here; the dry run needs them")
    return venv / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to build the environment (a fresh folder)")
    args = parser.parse_args()
    python = build(args.folder.resolve())
    print(os.fspath(python))


if __name__ == "__main__":
    main()
