"""Packaging for pacl-fast: the engine (`pacl_fast`), its fused kernels (`kernels`) and the CLI."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="pacl-fast",
    version="0.1.0",
    description="Open-vocabulary semantic segmentation with PACL (Patch Aligned Contrastive Learning) "
    "on open_clip, with fused Triton / tiled heads and compiled encoders.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["pacl_fast", "pacl_fast.cli", "pacl_fast.encoders", "pacl_fast.data", "pacl_fast.serve", "kernels"],
    # the demo weights: a synthetic-world CLIP (open_clip local-dir) and PACL weights on it
    package_data={
        "pacl_fast": ["assets/demo/*.safetensors", "assets/demo/clip/*", "assets/class_names/*/*.txt"],
        "pacl_fast.serve": ["static/*.html", "static/*.js", "static/*.css"],
    },
    include_package_data=True,
    install_requires=[
        # 2.5: torch.onnx.export(dynamo=True, dynamic_shapes=, external_data=); see benchmarks/torch_floor.py
        "torch>=2.5",
        "torchvision",
        "open_clip_torch>=2.24",
        "safetensors>=0.4",
        "numpy",
        "pillow>=9.1",
        "tqdm",
        "opencv-python-headless>=4.5",  # --protocol resizes as the papers' mmcv pipelines do (cv2.resize)
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout",
            "pytest-xdist",  # the README's test command runs on every core (-n auto)
            "pytest-benchmark",
            "ruff",
            "onnx",
            "onnxruntime",
            "onnxscript",
            "webdataset",
            "openvino>=2024.0",
            "nncf>=2.10",
            "httpx",
            "selenium",
            "timm>=1.0",  # ProxyCLIP's vision foundation models (the vfm extra)
        ],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "trt": ["onnx", "onnxscript", "tensorrt>=10.1"],
        "openvino": ["openvino>=2024.0", "nncf>=2.10", "onnx", "onnxscript"],
        "serve": [
            "fastapi>=0.100",
            "uvicorn[standard]>=0.29",
            "python-multipart>=0.0.13",
            "prometheus-client>=0.17",
            "requests",  # the README's Python client
        ],
        "client": ["requests"],  # only to call a service (the README's Python client)
        "train": ["webdataset"],
        # ProxyCLIP's vision foundation models (DINO ViT-B/8, DINOv2 ViT-B/14 with registers) on timm's modules
        "vfm": ["timm>=1.0"],
    },
    entry_points={"console_scripts": ["pacl-fast = pacl_fast.cli:console"]},
)
