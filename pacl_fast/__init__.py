"""pacl-fast: open-vocabulary semantic segmentation with PACL on open_clip.

from pacl_fast import Segmenter
segmenter = Segmenter("ViT-B-16", "laion2b_s34b_b88k", pacl_weights="pacl.safetensors")
result = segmenter.predict("photo.jpg", ["cat", "sofa", "floor"])
"""

from pacl_fast.backbone import ClipBackbone, ClipIdentity, RandomWeightsWarning, load_clip
from pacl_fast.images import Geometry, SlidingWindow, load_image
from pacl_fast.model import PACL, PACLConfig, VisionEmbedder, compatibility, contrastive_loss
from pacl_fast.results import BatchError, ImageError, Segmentation
from pacl_fast.segmenter import Segmenter
from pacl_fast.weights import PACLMetadata, load_pacl, read_pacl_weights, save_pacl_weights

__version__ = "0.1.0"

__all__ = [
    "PACL",
    "BatchError",
    "ClipBackbone",
    "ClipIdentity",
    "Geometry",
    "ImageError",
    "PACLConfig",
    "PACLMetadata",
    "RandomWeightsWarning",
    "Segmentation",
    "Segmenter",
    "SlidingWindow",
    "VisionEmbedder",
    "compatibility",
    "contrastive_loss",
    "load_clip",
    "load_image",
    "load_pacl",
    "read_pacl_weights",
    "save_pacl_weights",
]
