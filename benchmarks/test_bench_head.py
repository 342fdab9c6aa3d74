"""Micro-benchmarks of the head backends (see benchmarks/conftest.py for how to run and compare).

Groups: C=150 classes from a 32x32 grid to 512x512, scene-like and random logits
(``benchmarks.head``), with and without scores; the baseline of each group is the reference head.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.head import random_logits, scene_logits
from pacl_fast.head import Head

CLASSES, OUT = 150, (512, 512)
LOGITS = {"scene": scene_logits(CLASSES), "random": random_logits(CLASSES)}


@pytest.mark.parametrize("data", sorted(LOGITS))
@pytest.mark.parametrize("with_scores", [True, False], ids=["scores", "labels"])
@pytest.mark.parametrize("backend", ["reference", "tiled", "fast"])
def test_head(benchmark, backend: str, with_scores: bool, data: str) -> None:
    benchmark.group = f"head C={CLASSES} 512x512 {data} {'scores' if with_scores else 'labels only'}"
    benchmark.extra_info["baseline"] = backend == "reference"
    head, logits = Head(backend), LOGITS[data]
    labels, scores = benchmark(head.segment, logits, OUT, logit_scale=100.0, with_scores=with_scores)
    assert labels.shape == (1, *OUT) and labels.dtype == torch.int16
    assert (scores is None) == (not with_scores)
