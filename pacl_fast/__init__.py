"""pacl-fast: open-vocabulary semantic segmentation on open_clip: PACL, or a training-free method.

from pacl_fast import Segmenter
segmenter = Segmenter("ViT-B-16", "laion2b_s34b_b88k")  # NACLIP on stock weights
segmenter = Segmenter("ViT-B-16", "laion2b_s34b_b88k", pacl_weights="pacl.safetensors")  # PACL
result = segmenter.predict("photo.jpg", ["cat", "sofa", "floor"])

Names are imported on first use (PEP 562), so that ``import pacl_fast.cli`` and ``pacl-fast --help``
do not pay for torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pacl_fast import deferred_imports as _deferred_imports

__version__ = "0.1.0"

# open_clip's import runs without torchvision's and timm's package __init__, which a ViT CLIP never uses (~1.4 s
# of a one-image `pacl-fast segment`); they run on first use. See pacl_fast/deferred_imports.py.
_deferred_imports.defer_while_importing("open_clip", _deferred_imports.OPEN_CLIP_DEFERRED)

#: public name -> module that defines it
_EXPORTS = {
    "PACL": "pacl_fast.model",
    "PACLConfig": "pacl_fast.model",
    "VisionEmbedder": "pacl_fast.model",
    "compatibility": "pacl_fast.model",
    "contrastive_loss": "pacl_fast.model",
    "ClipBackbone": "pacl_fast.backbone",
    "ClipIdentity": "pacl_fast.backbone",
    "RandomWeightsWarning": "pacl_fast.backbone",
    "WeightsUnavailableError": "pacl_fast.backbone",
    "EncoderUnavailableError": "pacl_fast.encoders.base",
    "load_clip": "pacl_fast.backbone",
    "Geometry": "pacl_fast.images",
    "SlidingWindow": "pacl_fast.images",
    "load_image": "pacl_fast.images",
    "METHODS": "pacl_fast.methods",
    "TrainingFreeCLIP": "pacl_fast.methods",
    "BatchError": "pacl_fast.results",
    "ImageError": "pacl_fast.results",
    "Segmentation": "pacl_fast.results",
    "Segmenter": "pacl_fast.segmenter",
    "Parts": "pacl_fast.build",
    # not ``build``: the submodule pacl_fast.build takes that attribute once anything imports it
    # (``from pacl_fast import build`` would then give the module); it is ``from pacl_fast.build import build``.
    "build_model": "pacl_fast.build",
    "PACLMetadata": "pacl_fast.weights",
    "load_pacl": "pacl_fast.weights",
    "read_pacl_weights": "pacl_fast.weights",
    "save_pacl_weights": "pacl_fast.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pacl_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from pacl_fast.backbone import (  # noqa: F401
        ClipBackbone,
        ClipIdentity,
        RandomWeightsWarning,
        WeightsUnavailableError,
        load_clip,
    )
    from pacl_fast.build import Parts, build_model  # noqa: F401
    from pacl_fast.encoders.base import EncoderUnavailableError  # noqa: F401
    from pacl_fast.images import Geometry, SlidingWindow, load_image  # noqa: F401
    from pacl_fast.methods import METHODS, TrainingFreeCLIP  # noqa: F401
    from pacl_fast.model import PACL, PACLConfig, VisionEmbedder, compatibility, contrastive_loss  # noqa: F401
    from pacl_fast.results import BatchError, ImageError, Segmentation  # noqa: F401
    from pacl_fast.segmenter import Segmenter  # noqa: F401
    from pacl_fast.weights import PACLMetadata, load_pacl, read_pacl_weights, save_pacl_weights  # noqa: F401
