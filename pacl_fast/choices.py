"""Every choice and limit a user can name, in one place (standard library only).

The library, the command line (whose ``--help`` must not import torch), the service and its page
(``/v1/info``) all read these lists from here, so a new method, encoder or preset is added once.
Modules that implement a choice keep their own tables keyed by these names (``methods.py``'s
blocks, ``data/segmentation.py``'s readers, ``protocols.py``'s presets); ``tests/test_choices.py``
holds those tables to the lists here. ``kernels/`` imports nothing from ``pacl_fast``, so its copy
of the training-free names is held equal by the same test.
"""

from __future__ import annotations

#: The methods that need no PACL weights and change CLIP's last block only (``pacl_fast.methods``).
TRAINING_FREE_METHODS: tuple[str, ...] = ("maskclip", "sclip", "clearclip", "naclip")
#: Training-free methods that borrow a vision foundation model's attention (``pacl_fast.proxyclip``).
VFM_METHODS: tuple[str, ...] = ("proxyclip",)
#: What turns patch tokens into class-comparable embeddings.
METHODS: tuple[str, ...] = ("pacl", *TRAINING_FREE_METHODS, *VFM_METHODS)
#: What runs without PACL weights: the best of the four on the eight standard benchmarks (NACLIP's paper).
DEFAULT_TRAINING_FREE_METHOD = "naclip"

#: The value that lets the engine choose (``encoder``, ``dtype``): the fastest this machine runs for the work
#: announced, and why (``pacl_fast.encoders.auto``).
AUTO = "auto"
#: Encoder backends (``pacl_fast.encoders``).
ENCODERS: tuple[str, ...] = ("torch", "compile", "onnxruntime", "tensorrt", "openvino")
#: What a user can name as the encoder: ``auto`` (the default) or a backend.
ENCODER_CHOICES: tuple[str, ...] = (AUTO, *ENCODERS)
#: Encoder precisions a user can name (``int8``: OpenVINO only).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")
#: What a user can name as the precision: ``auto`` (the default) or a precision.
DTYPE_CHOICES: tuple[str, ...] = (AUTO, *DTYPES)
#: Precisions of the text tower (torch and compile encoders).
TEXT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: Head backends (``pacl_fast.head``).
HEAD_BACKENDS: tuple[str, ...] = ("reference", "fast", "tiled", "triton")

#: The training-free papers whose evaluation protocols are presets (``pacl_fast.protocols``).
PROTOCOLS: tuple[str, ...] = ("sclip", "naclip", "clearclip", "proxyclip")
#: Benchmarks ``eval`` reads (``pacl_fast.data.segmentation``), sorted.
DATASETS: tuple[str, ...] = (
    "ade20k", "cityscapes", "cocoobject", "cocostuff", "context59", "context60", "synthetic", "voc20", "voc21",
)  # fmt: skip

#: Prompt-template presets every door accepts (``pacl_fast.prompts.template_set``).
TEMPLATE_PRESETS: tuple[str, ...] = ("imagenet", "short", "single", "synthetic")

#: export format -> (precisions it builds, the default)
EXPORT_PRECISIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "onnx": (("fp32", "fp16"), "fp32"),
    "tensorrt": (("fp16", "fp32"), "fp16"),
    "openvino": (("fp32", "bf16", "int8"), "fp32"),
}
EXPORT_FORMATS: tuple[str, ...] = tuple(EXPORT_PRECISIONS)

#: Refuse decoded images larger than this. Segmenting one image peaks at ~30 bytes a pixel (measured:
#: decoded uint8, float copy, int16 labels, float32 scores; the overlay is blended in bands), so 40 MP
#: is ~1.2 GB per image in flight, times the batch: batch 8 of 40 MP images is ~9.6 GB, which still
#: fits a 24 GiB machine. PIL's own bomb limit (179 MP) would allow ~5 GB an image.
DEFAULT_MAX_PIXELS = 40_000_000
#: Longest side over shortest side that an image may have (panoramas reach ~10).
MAX_ASPECT_RATIO = 16
#: Image formats the service decodes (Pillow format names).
SERVE_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
#: Vision foundation models ProxyCLIP borrows its attention from (``pacl_fast.vfm``).
VFMS: tuple[str, ...] = ("dino_vitb8", "dinov2_vitb14_reg")
#: The VFM a VFM method runs without one named: ProxyCLIP's (``configs/base_config.py`` l. 6, ``vfm_model='dino'``).
DEFAULT_VFM = "dino_vitb8"
