"""Micro-benchmarks of the head backends (see benchmarks/conftest.py for how to run and compare).

Groups: C=150 classes from a 32x32 grid to 512x512, scene-like and random logits
(``benchmarks.head``), with and without scores; the baseline of each group is the reference head.
``tiled`` is the CPU head in eager torch, ``native`` the same head with the native kernel
(``kernels/native.py``), ``fast`` what ``Head()`` gives (``$PACL_FAST_NATIVE`` as set, ``auto`` by default).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.head import random_logits, scene_logits
from kernels import native
from pacl_fast.head import Head

CLASSES, OUT = 150, (512, 512)
LOGITS = {"scene": scene_logits(CLASSES), "random": random_logits(CLASSES)}
#: ``$PACL_FAST_NATIVE`` per benchmarked backend (None: as the environment says).
NATIVE_MODE = {"tiled": "off", "native": "on"}


@pytest.mark.parametrize("data", sorted(LOGITS))
@pytest.mark.parametrize("with_scores", [True, False], ids=["scores", "labels"])
@pytest.mark.parametrize("backend", ["reference", "tiled", "native", "fast"])
def test_head(benchmark, backend: str, with_scores: bool, data: str, monkeypatch) -> None:
    benchmark.group = f"head C={CLASSES} 512x512 {data} {'scores' if with_scores else 'labels only'}"
    benchmark.extra_info["baseline"] = backend == "reference"
    if backend in NATIVE_MODE:
        monkeypatch.setenv(native.ENV, NATIVE_MODE[backend])
    if backend == "native" and native.kernel() is None:
        pytest.skip(f"no native kernel: {native.status()}")
    head, logits = Head("tiled" if backend in NATIVE_MODE else backend), LOGITS[data]
    labels, scores = benchmark(head.segment, logits, OUT, logit_scale=100.0, with_scores=with_scores)
    assert labels.shape == (1, *OUT) and labels.dtype == torch.int16
    assert (scores is None) == (not with_scores)
