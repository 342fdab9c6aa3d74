"""Micro-benchmarks of the encoder backends (see benchmarks/conftest.py for how to run and compare).

Random-init open_clip ViT-B-16 through PACL (an untrained embedder costs what a trained one does),
batch 4, at a small (112 px) and the default (224 px) size; the baseline of each group is the
eager fp32 torch encoder. Backends whose library is missing are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from pacl_fast.encoders import EncoderUnavailableError, make_encoder

BATCH = 4
BACKENDS = [
    ("torch", torch.float32, {}),
    ("torch", torch.bfloat16, {}),
    ("compile", torch.bfloat16, {}),
    ("onnxruntime", torch.float32, {}),
    ("openvino", torch.float32, {}),
    ("openvino", None, {"precision": "int8"}),
]


@pytest.mark.parametrize("size", [112, 224])
@pytest.mark.parametrize(
    "name,dtype,options", BACKENDS, ids=[f"{n}:{o.get('precision') or str(d)[6:]}" for n, d, o in BACKENDS]
)
def test_encoder(benchmark, model, name: str, dtype, options: dict, size: int) -> None:
    """Exported graphs and quantised models are kept in the encoder cache ($PACL_FAST_CACHE or
    ~/.cache/pacl-fast), so only the first run pays for exports and int8 calibration."""
    benchmark.group = f"encoder ViT-B-16 {size}px batch {BATCH}"
    benchmark.extra_info["baseline"] = name == "torch" and dtype == torch.float32
    try:
        encoder = make_encoder(name, model, dtype, **options)
    except (EncoderUnavailableError, ValueError, TypeError) as error:
        pytest.skip(f"{name}: {error}")
    pixels = torch.randn(BATCH, 3, size, size)
    encoder.encode_image(pixels)  # export / compile / quantise outside the timing
    patches = benchmark.pedantic(encoder.encode_image, (pixels,), rounds=5, warmup_rounds=1)
    assert patches.shape == (BATCH, size // 16, size // 16, model.backbone.embed_dim)
