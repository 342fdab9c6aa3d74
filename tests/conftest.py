"""Shared fixtures. Everything a test needs is made here, nothing is downloaded."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA the Triton kernels are tested in the interpreter. Triton reads TRITON_INTERPRET when
# it is first imported (open_clip imports it), so this must come before any other import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pacl_fast.backbone import RandomWeightsWarning, load_clip  # noqa: E402
from pacl_fast.demo import TINY_CLIP_CONFIG  # noqa: E402
from pacl_fast.model import PACL  # noqa: E402


def quiet_load_clip(*args, **kwargs):
    """load_clip without the random-weights warning (tests use random CLIPs on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_clip(*args, **kwargs)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return TINY_CLIP_CONFIG


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config):
    torch.manual_seed(0)
    return quiet_load_clip(tiny_config)


@pytest.fixture()
def tiny_pacl(tiny_backbone) -> PACL:
    torch.manual_seed(1)
    model = PACL(tiny_backbone)
    # Make the MLP branch non-trivial so that tests see it (it starts at zero by design).
    torch.nn.init.normal_(model.embedder.fc2.weight, std=0.05)
    return model


def make_segmenter(config, pacl_weights=None, **kwargs):
    from pacl_fast.segmenter import Segmenter

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        kwargs.setdefault("method", "pacl")  # most tests exercise PACL; training-free methods ask for theirs
        return Segmenter(config, pacl_weights=pacl_weights, device="cpu", **kwargs)
