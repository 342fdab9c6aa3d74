"""The training-free papers' evaluation protocols as exact presets (``pacl-fast eval --protocol``).

SCLIP, NACLIP, ClearCLIP and ProxyCLIP each evaluate the eight standard benchmarks with an
mmsegmentation config per dataset (``configs/cfg_*.py``) on top of their segmentor's defaults. :data:`PRESETS`
holds what those files set, read from the repositories at the commits in :data:`REPOSITORIES`;
every preset's ``source`` cites the file and lines each value comes from.

What all four do, per image (``clip_segmentor.py`` / ``naclip.py`` / ``clearclip_segmentor.py`` /
``proxyclip_segmentor.py``), and what the engine does under ``--protocol``:

1. Resize the image with mmcv's ``Resize(scale=(2048, S), keep_ratio=True)``: factor
   ``min(2048 / long, S / short)``, sides rounded half up, ``cv2.resize`` bilinear on the uint8
   image (no antialiasing); normalise with CLIP's mean/std. The engine resizes the same way
   (:meth:`EvalProtocol.preprocessor`: ``images.plan_mmcv_resize``, ``images.resize_mmcv``), where
   outside a protocol it resizes bicubic, antialiased, short side rounded to nearest.
2. Whole image, or ``slide_crop`` windows every ``slide_stride`` pixels (the last window flush
   with the border; windows never padded past the image). Each window's patch cosines are
   bilinearly upsampled to the window's pixels, summed into the canvas and divided by the count.
3. Resize the cosine logits ``[Q, H, W]`` (``Q`` text queries: every synonym of every class) to
   the original image size (bilinear, ``align_corners=False``). NACLIP then runs PAMR on them
   (:func:`pacl_fast.refine.pamr`), guided by its network input (the resized, normalised image)
   resized back to the original size, bilinear (``naclip.py`` l. 129-132); the engine gives PAMR
   the same guide (:meth:`EvalProtocol.pamr_guide`).
4. :func:`protocol_labels`: ``softmax(logit_scale * logits)`` over all queries; each class takes
   its best synonym (max after the softmax); SCLIP's VOC21 zeroes the classes that win less
   than ``area_threshold`` of the foreground pixels; argmax; pixels whose best probability is
   under ``prob_threshold`` become class 0 (the background of VOC21, Context60, COCO-Object).

Text side: each query is embedded with the 80 ImageNet templates (each normalised, averaged,
normalised again), the same as ``pacl_fast.prompts.IMAGENET_TEMPLATES``. The class-name files are
shipped verbatim in ``pacl_fast/assets/class_names`` (:data:`NAME_FILES` holds their git blob ids)
and parsed as the repositories parse them (:func:`read_names_file`).

The CLIP: all four run OpenAI's ViT-B/16 weights with QuickGELU (``--clip ViT-B-16 --clip-weights
openai`` builds exactly that: ``pacl_fast.backbone.pretrained_settings``), and the training-free last
blocks and positional resizes of ``pacl_fast.methods`` (ProxyCLIP: ``pacl_fast.proxyclip``, with DINO
ViT-B/8 by default, ``--method proxyclip --vfm dino_vitb8 --vfm-weights dino_vitbase8_pretrain.pth``).
A protocol fixes the evaluation, not the method: run ``--protocol proxyclip`` with ``--method proxyclip``
to reproduce the paper. Details the engine does not follow are
recorded per preset (``precision``, ``crop_remainder``) and listed, each with its measured effect,
in :data:`DIFFERENCES`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pacl_fast.choices import PROTOCOLS
from pacl_fast.images import DEFAULT_MAX_PIXELS, Geometry, SegmentationPreprocess
from pacl_fast.refine import pamr, resized_input_guide

#: Where the presets were read: repository and commit.
REPOSITORIES = {
    "sclip": ("wangf3014/SCLIP", "b56bd3014b9e8a3ee3450bcfc53700a67d627b7a"),
    "naclip": ("sinahmr/NACLIP", "0cac3a651f753b11315ea799cfbfabf79da1bd76"),
    "clearclip": ("mc-lan/ClearCLIP", "ad68a404d55d48d27330b93554eb64a234ff717f"),
    "proxyclip": ("mc-lan/ProxyCLIP", "e7b767fbc58ea218a3b8ba34cd92db521cc5f2e1"),
}

NAMES_DIR = Path(__file__).parent / "assets" / "class_names"

#: Shipped class-name files (under :data:`NAMES_DIR`) -> git blob id of the repository file they copy.
#: NACLIP's ``configs/cls_*.txt`` are the same blobs as SCLIP's; ClearCLIP's differ only for
#: VOC21, VOC20 and COCO-Object (no synonyms, background as the word "background"). ProxyCLIP's are
#: SCLIP's blobs but for VOC20 (ClearCLIP's blob), VOC21 and COCO-Object (their own: background as 26
#: and 17 kinds of stuff separated by "; ", no synonyms for the other classes).
NAME_FILES = {
    "sclip/cls_voc21.txt": "a618275ddc2525ab2fbede9c81649da47b57de76",
    "sclip/cls_voc20.txt": "5f1ce8355a724fd73af74adc6022281da9542973",
    "sclip/cls_context60.txt": "a6209938e2a6e57018af0ed6896176a7f1ace54f",
    "sclip/cls_context59.txt": "f9fb2a22f62cbd5a5a27cb2677636506fbbbc551",
    "sclip/cls_coco_object.txt": "3fdfe261f558b6502f0d5bfe32fdcc466df808ed",
    "sclip/cls_coco_stuff.txt": "b76c5a676308c9f328635938cf86f6fd27a985bb",
    "sclip/cls_ade20k.txt": "dba5aa2ce0c703b9dbf07dea5ee5e5230c8b51d3",
    "sclip/cls_city_scapes.txt": "a1560efb268b4c8a52a68e41df402a4b33171d44",
    "clearclip/cls_voc21.txt": "913c968f5a11102741b5fa17cf6aba9c1814b419",
    "clearclip/cls_voc20.txt": "3f073de079b698e44eab182776ea0026009b8973",
    "clearclip/cls_coco_object.txt": "e290149963116c873fe6c54d28337a78bc500d8a",
    "proxyclip/cls_voc21.txt": "5b8dc7e2b75c5e604fcb772c8fe9bbb877719624",
    "proxyclip/cls_coco_object.txt": "db0f477941c551be23719fdff5036961366d05c9",
}

# --dataset key -> (the repositories' config file, class-name file)
_FILES = {
    "voc21": ("cfg_voc21.py", "cls_voc21.txt"),
    "voc20": ("cfg_voc20.py", "cls_voc20.txt"),
    "context60": ("cfg_context60.py", "cls_context60.txt"),
    "context59": ("cfg_context59.py", "cls_context59.txt"),
    "cocoobject": ("cfg_coco_object.py", "cls_coco_object.txt"),
    "cocostuff": ("cfg_coco_stuff164k.py", "cls_coco_stuff.txt"),
    "ade20k": ("cfg_ade20k.py", "cls_ade20k.txt"),
    "cityscapes": ("cfg_city_scapes.py", "cls_city_scapes.txt"),
}


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@cache
def read_names_file(relative: str) -> tuple[tuple[str, ...], ...]:
    """A shipped class-name file, parsed as the repositories parse it (``get_cls_idx``).

    One class per line; SCLIP and NACLIP split a line on ``", "``, ClearCLIP on ``","``, ProxyCLIP on
    ``"; "`` (``proxyclip_segmentor.py`` l. 329-340); the files two repositories share hold none of
    these separators, so they read the same whichever splits them. Only the newline is removed, nothing
    is stripped, so names keep any other whitespace (Context60's last name is ``"wood "``, so its prompts
    read "a photo of a wood ."). This differs on purpose from
    :func:`pacl_fast.data.names.parse_class_names`, which strips: these presets are exact.
    """
    if relative not in NAME_FILES:
        raise ValueError(f"unknown class-name file {relative!r}; shipped: {', '.join(sorted(NAME_FILES))}")
    path = NAMES_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"class-name file {path} is missing from the installed package")
    data = path.read_bytes()
    if git_blob_id(data) != NAME_FILES[relative]:
        raise ValueError(f"class-name file {path} was changed: it is not the repository's file {NAME_FILES[relative]}")
    separator = {"clearclip": ",", "proxyclip": "; "}.get(relative.partition("/")[0], ", ")
    lines = data.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final newline ends the last line, as readlines() sees it
    names = tuple(tuple(line.split(separator)) for line in lines)
    if any(not name for line in names for name in line):
        raise ValueError(f"class-name file {path} has an empty name")
    return names


@dataclass(frozen=True)
class EvalProtocol:
    """One paper's evaluation of one benchmark, as its repository's config sets it.

    Fields (what the engine does with each):
        name, dataset: the protocol (``sclip | naclip | clearclip | proxyclip``) and the ``--dataset`` key.
        logit_scale: cosines are multiplied by it before the softmax over queries.
        prob_threshold: pixels whose best class probability is under it become class 0
            (0.0: off, the repositories' default, since a probability is never under 0).
        area_threshold: SCLIP VOC21 only: classes (other than 0) that win at most this share of
            the foreground pixels are zeroed before the argmax (:func:`suppress_small_classes`).
        short_side: the image's short side before inference (``max_long_side`` caps the long side).
        slide_crop, slide_stride: sliding windows in pixels; ``None`` for both: the whole image.
        background: class 0 asked as ``"stuff"`` (26 kinds of stuff), as the ``"word"``
            background, or ``None`` (the dataset has no background class).
        names_file, class_names: the class-name file (under ``pacl_fast/assets/class_names``) and
            its classes, each a tuple of synonyms, in the dataset's label order.
        templates: ``"imagenet"``, CLIP's 80 ImageNet templates.
        pamr: ``(iterations, dilations)`` of PAMR on the image-size cosine logits, or ``None``.
        crop_remainder: ``"drop"`` (pixels past the last whole patch are not seen; logits are
            stretched over the window) or ``"pad"`` (centred zero padding after normalisation, logits
            cropped back: ClearCLIP to the patch multiple, ProxyCLIP to a multiple of 56).
        precision: the repositories run CLIP in ``"fp16"`` on CUDA.
        source: ``repository file:lines`` for every value above.
    """

    name: str
    dataset: str
    logit_scale: float
    prob_threshold: float
    area_threshold: float | None
    short_side: int
    slide_crop: int | None
    slide_stride: int | None
    background: str | None
    names_file: str
    templates: str
    pamr: tuple[int, tuple[int, ...]] | None
    crop_remainder: str
    source: tuple[str, ...]
    max_long_side: int = 2048
    precision: str = "fp16"
    class_names: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", read_names_file(self.names_file))

    @property
    def whole_image(self) -> bool:
        return self.slide_crop is None

    @property
    def background_index(self) -> int | None:
        """The class that ``prob_threshold`` and ``area_threshold`` fall back to: 0 where there is a background."""
        return 0 if self.background is not None else None

    @property
    def queries(self) -> tuple[str, ...]:
        """Every synonym of every class, in order (duplicates kept: SCLIP's COCO-Object lists "bed" twice)."""
        return tuple(name for synonyms in self.class_names for name in synonyms)

    @property
    def query_class(self) -> np.ndarray:
        """``[Q]`` int64: the class of each query."""
        return np.repeat(np.arange(len(self.class_names)), [len(s) for s in self.class_names])

    def preprocessor(
        self,
        patch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        grid_patch: int | None = None,
    ) -> SegmentationPreprocess:
        """The image -> model input step of this protocol: mmcv's ``Resize(scale=(max_long_side, short_side),
        keep_ratio=True)`` as the repositories' test pipelines run it (``images.plan_mmcv_resize``,
        ``images.resize_mmcv``: OpenCV bilinear, no antialiasing), normalised, padded to a multiple of
        ``patch_size`` (the model's pixel multiple; ``grid_patch``: its output grid's cell, default the same)."""
        return SegmentationPreprocess(
            self.short_side, patch_size, mean, std, max_pixels, kernel="mmcv", max_long_side=self.max_long_side,
            grid_patch=grid_patch,
        )  # fmt: skip

    def pamr_guide(self, pixels: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """NACLIP's PAMR guide for one prepared image: the network input ``[3, canvas_h, canvas_w]`` (normalised;
        its padding is cut off) resized to the original size -> ``[3, H, W]`` (``refine.resized_input_guide``)."""
        height, width = geometry.resized_size
        return resized_input_guide(pixels[None, :, :height, :width], geometry.original_size)[0]

    def postprocess(self, logits: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine logits ``[Q, H, W]`` or ``[B, Q, H, W]`` at the original image size -> labels ``[(B,) H, W]`` int64.

        ``image`` (``[(B,) 3, H, W]`` float) is PAMR's guide, needed when the protocol runs PAMR: NACLIP's is
        :meth:`pamr_guide`. PAMR is applied to the cosine logits before the logit scale, as NACLIP does.
        """
        if self.pamr is not None:
            if image is None:
                raise ValueError(
                    f"protocol {self.name} on {self.dataset} runs PAMR: pass the image that guides it [3, H, W] "
                    "(NACLIP's: pamr_guide)"
                )
            iterations, dilations = self.pamr
            batched = logits.dim() == 4
            logits = pamr(image if batched else image[None], logits if batched else logits[None], iterations, dilations)
            logits = logits if batched else logits[0]
        return protocol_labels(
            logits,
            self.query_class,
            logit_scale=self.logit_scale,
            prob_threshold=self.prob_threshold,
            area_threshold=self.area_threshold,
            background_index=0,  # the repositories write 0; thresholds are set only where 0 is background
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (for reports and run fingerprints)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["class_names"] = [list(n) for n in self.class_names]
        values["pamr"] = None if self.pamr is None else [self.pamr[0], list(self.pamr[1])]
        values["source"] = list(self.source)
        return values


# --------------------------------------------------------------------------------------------
# Post-processing on image-size cosine logits (what the engine's head does not do)


def _query_index(query_class: np.ndarray | torch.Tensor | Sequence[int], num_queries: int, device) -> torch.Tensor:
    index = torch.as_tensor(np.asarray(query_class), dtype=torch.int64, device=device)
    if index.dim() != 1 or index.numel() != num_queries:
        raise ValueError(f"query_class must list the class of each of the {num_queries} queries, got {index.shape}")
    if index.min() < 0 or set(range(int(index.max()) + 1)) - set(index.tolist()):
        raise ValueError("query_class must name classes 0..C-1, each with at least one query")
    return index


def class_probabilities(
    logits: torch.Tensor, query_class: np.ndarray | torch.Tensor | Sequence[int], logit_scale: float
) -> torch.Tensor:
    """Cosine logits ``[..., Q, H, W]`` -> class probabilities ``[..., C, H, W]`` float32.

    ``softmax(logit_scale * logits)`` over all ``Q`` queries, then each class takes the largest
    probability among its queries (its best synonym). Probabilities of one class's synonyms are
    not added: a class with more synonyms is not favoured, but the synonyms share the softmax.
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must be [..., Q, H, W], got shape {list(logits.shape)}")
    index = _query_index(query_class, logits.shape[-3], logits.device)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probabilities = torch.softmax(logits.to(dtype) * logit_scale, dim=-3)  # [..., Q, H, W]
    num_classes = int(index.max()) + 1
    counts = torch.bincount(index, minlength=num_classes)
    single = torch.nonzero(counts == 1).flatten()  # classes asked with one name: a plain copy
    out = probabilities.new_zeros((*logits.shape[:-3], num_classes, *logits.shape[-2:]))  # [..., C, H, W]
    positions = torch.nonzero(index[None, :] == single[:, None])[:, 1]  # the query of each single class
    out[..., single, :, :] = probabilities[..., positions, :, :]
    for cls in torch.nonzero(counts > 1).flatten().tolist():  # synonyms: the best of them
        out[..., cls, :, :] = probabilities[..., index == cls, :, :].amax(dim=-3)
    return out


def suppress_small_classes(
    probabilities: torch.Tensor, area_threshold: float, background_index: int = 0
) -> torch.Tensor:
    """SCLIP's area threshold (``clip_segmentor.py`` lines 162-167): ``[..., C, H, W]`` -> same shape.

    Count the pixels each class wins (argmax); a class other than ``background_index`` is kept
    only if its count is greater than ``area_threshold`` times all pixels won by classes other than
    the background; the probabilities of the others are set to 0, so their pixels go to the next
    best class (then :func:`protocol_labels` applies the probability threshold to what is left).
    Counts are compared in float32, as SCLIP does.
    """
    num_classes = probabilities.shape[-3]
    winners = probabilities.argmax(dim=-3).flatten(-2)  # [..., H*W]
    counts = torch.zeros((*winners.shape[:-1], num_classes), dtype=torch.float32, device=probabilities.device)
    counts.scatter_add_(-1, winners, torch.ones_like(winners, dtype=torch.float32))  # [..., C]
    foreground = torch.ones(num_classes, dtype=torch.bool, device=probabilities.device)
    foreground[background_index] = False
    total = (counts * foreground).sum(dim=-1, keepdim=True)  # [..., 1]
    keep = (counts > area_threshold * total) | ~foreground  # [..., C]
    return probabilities * keep[..., None, None].to(probabilities.dtype)


def protocol_labels(
    logits: torch.Tensor,
    query_class: np.ndarray | torch.Tensor | Sequence[int],
    *,
    logit_scale: float,
    prob_threshold: float = 0.0,
    area_threshold: float | None = None,
    background_index: int = 0,
) -> torch.Tensor:
    """The repositories' ``postprocess_result``: cosine logits ``[..., Q, H, W]`` -> labels ``[..., H, W]`` int64.

    :func:`class_probabilities`, then (if ``area_threshold``) :func:`suppress_small_classes`, then
    the argmax over classes (ties to the lowest index, as ``torch.argmax``), and pixels whose best
    probability is under ``prob_threshold`` get ``background_index``.
    """
    probabilities = class_probabilities(logits, query_class, logit_scale)  # [..., C, H, W]
    if area_threshold is not None:
        probabilities = suppress_small_classes(probabilities, area_threshold, background_index)
    labels = probabilities.argmax(dim=-3)
    best = probabilities.amax(dim=-3)
    return torch.where(best < prob_threshold, torch.full_like(labels, background_index), labels)


# --------------------------------------------------------------------------------------------
# The presets


def _background(dataset: str, names_file: str) -> str | None:
    """How a class-name file asks for class 0 of VOC21, Context60, COCO-Object: "word" or "stuff"."""
    if dataset not in ("voc21", "context60", "cocoobject"):
        return None
    return "word" if read_names_file(names_file)[0] == ("background",) else "stuff"


def _build() -> dict[tuple[str, str], EvalProtocol]:
    presets = {}
    for dataset, (config, names) in _FILES.items():
        # SCLIP: clip_segmentor.py __init__ defaults, then configs/<config> (model keys at lines 5-8).
        sclip_keys = {
            "voc21": {"logit_scale": 65.0, "prob_threshold": 0.1, "area_threshold": 0.1},
            "context60": {"logit_scale": 50.0, "prob_threshold": 0.1},
            "cocoobject": {"logit_scale": 50.0, "prob_threshold": 0.1},
        }.get(dataset, {})
        sclip_short = {"cocostuff": 448, "cityscapes": 560}.get(dataset, 336)
        sclip_lines = {"voc21": ("5-8", 17), "context60": ("5-7", 16), "cocoobject": ("5-7", 16)}.get(
            dataset, ("5", 14)
        )
        presets["sclip", dataset] = EvalProtocol(
            name="sclip",
            dataset=dataset,
            logit_scale=sclip_keys.get("logit_scale", 40.0),
            prob_threshold=sclip_keys.get("prob_threshold", 0.0),
            area_threshold=sclip_keys.get("area_threshold"),
            short_side=sclip_short,
            slide_crop=224,
            slide_stride=112,
            background=_background(dataset, f"sclip/{names}"),
            names_file=f"sclip/{names}",
            templates="imagenet",
            pamr=None,
            crop_remainder="drop",
            source=(
                f"wangf3014/SCLIP configs/{config}:{sclip_lines[0]} (name_path and model keys set)",
                f"wangf3014/SCLIP configs/{config}:{sclip_lines[1]} (Resize scale=(2048, {sclip_short}))",
                "wangf3014/SCLIP clip_segmentor.py:19-21 (defaults: pamr_steps=0, prob_thd=0.0, logit_scale=40, "
                "slide_stride=112, slide_crop=224, area_thd=None)",
                "wangf3014/SCLIP clip_segmentor.py:141-170 (slide, resize to the original size, postprocess_result)",
                f"wangf3014/SCLIP configs/{names} (class names, split on ', ': clip_segmentor.py:201-212)",
            ),
        )
        # NACLIP: naclip.py __init__ defaults (PAMR on), then configs/<config>.
        naclip_keys = {
            "voc21": {"prob_threshold": 0.1, "whole": True},
            "voc20": {"whole": True},
            "context60": {"prob_threshold": 0.1},
            "cocoobject": {"prob_threshold": 0.1},
        }.get(dataset, {})
        naclip_short = 560 if dataset == "cityscapes" else 336
        naclip_lines = {"voc21": ("5-7", 16), "voc20": ("5-6", 15), "context60": ("5-6", 15), "cocoobject": ("5-6", 15)}
        naclip_lines = naclip_lines.get(dataset, ("5", 14))
        whole = naclip_keys.get("whole", False)
        presets["naclip", dataset] = EvalProtocol(
            name="naclip",
            dataset=dataset,
            logit_scale=40.0,
            prob_threshold=naclip_keys.get("prob_threshold", 0.0),
            area_threshold=None,
            short_side=naclip_short,
            slide_crop=None if whole else 224,
            slide_stride=None if whole else 112,
            background=_background(dataset, f"sclip/{names}"),
            names_file=f"sclip/{names}",  # NACLIP's configs/cls_*.txt are SCLIP's blobs
            templates="imagenet",
            pamr=(10, (8, 16)),
            crop_remainder="drop",
            source=(
                f"sinahmr/NACLIP configs/{config}:{naclip_lines[0]} (name_path and model keys set"
                + (", slide_crop=0: whole image)" if whole else ")"),
                f"sinahmr/NACLIP configs/{config}:{naclip_lines[1]} (Resize scale=(2048, {naclip_short}))",
                "sinahmr/NACLIP naclip.py:20-22 (defaults: pamr_steps=10, pamr_stride=(8, 16), prob_thd=0.0, "
                "logit_scale=40, slide_stride=112, slide_crop=224)",
                "sinahmr/NACLIP naclip.py:121-135 (slide or whole, resize to the original size, PAMR on the cosines)",
                "sinahmr/NACLIP naclip.py:139-152 (postprocess_result)",
                f"sinahmr/NACLIP configs/{names} (class names, split on ', ': naclip.py:178-189)",
            ),
        )
        # ClearCLIP: clearclip_segmentor.py __init__ defaults, then configs/<config>.
        clear_threshold = {"voc21": 0.5, "context60": 0.15, "cocoobject": 0.4}.get(dataset, 0.0)
        clear_crop = 224 if dataset == "cityscapes" else 448
        clear_lines = {"voc21": ("5-6", 15), "context60": ("5-6", 15), "cocoobject": ("5-6", 15)}
        clear_lines = clear_lines.get(dataset, ("5-6", 15) if dataset == "cityscapes" else ("5", 14))
        clear_names = f"clearclip/{names}" if f"clearclip/{names}" in NAME_FILES else f"sclip/{names}"
        presets["clearclip", dataset] = EvalProtocol(
            name="clearclip",
            dataset=dataset,
            logit_scale=50.0,
            prob_threshold=clear_threshold,
            area_threshold=None,
            short_side=448,
            slide_crop=clear_crop,
            slide_stride=224,
            background=_background(dataset, clear_names),
            names_file=clear_names,  # its other configs/cls_*.txt are SCLIP's blobs
            templates="imagenet",
            pamr=None,
            crop_remainder="pad",
            source=(
                f"mc-lan/ClearCLIP configs/{config}:{clear_lines[0]} (name_path and model keys set)",
                f"mc-lan/ClearCLIP configs/{config}:{clear_lines[1]} (Resize scale=(2048, 448))",
                "mc-lan/ClearCLIP clearclip_segmentor.py:22-23 (defaults: prob_thd=0.0, logit_scale=50, "
                "slide_stride=224, slide_crop=448)",
                "mc-lan/ClearCLIP clearclip_segmentor.py:168-183 (windows padded to the patch size), 208 (fp16)",
                "mc-lan/ClearCLIP clearclip_segmentor.py:216-230 (postprocess_result)",
                f"mc-lan/ClearCLIP configs/{names} (class names, split on ',': clearclip_segmentor.py:281-292)",
            ),
        )
        presets["proxyclip", dataset] = _proxyclip(dataset, config, names)
    return presets


#: ProxyCLIP's configs: the lines of ``model = dict(...)`` keys and of ``Resize`` per dataset, and what they set.
_PROXYCLIP_CONFIG = {
    "voc21": ("5-6", 15, {"prob_threshold": 0.2}),
    "voc20": ("5", 14, {}),
    "context60": ("5-6", 15, {"prob_threshold": 0.15}),
    "context59": ("5", 14, {}),
    "cocoobject": ("5-6", 15, {"prob_threshold": 0.25}),
    "cocostuff": ("5", 14, {}),
    "ade20k": ("5", 14, {"short_side": 448}),
    "cityscapes": ("5-7", 16, {"short_side": 448, "slide_crop": 224}),
}


def _proxyclip(dataset: str, config: str, names: str) -> EvalProtocol:
    """ProxyCLIP: ``proxyclip_segmentor.py`` ``__init__`` defaults, then ``configs/<config>`` (on ``base_config.py``:
    OpenAI's ViT-B/16 and DINO ViT-B/8, the engine's ``--method proxyclip`` default VFM)."""
    lines, resize_line, keys = _PROXYCLIP_CONFIG[dataset]
    # Its own VOC21 and COCO-Object files; its cls_voc20.txt is ClearCLIP's blob, the others SCLIP's.
    names_file = next(f"{r}/{names}" for r in ("proxyclip", "clearclip", "sclip") if f"{r}/{names}" in NAME_FILES)
    short = keys.get("short_side", 336)
    repo = "mc-lan/ProxyCLIP"
    return EvalProtocol(
        name="proxyclip",
        dataset=dataset,
        logit_scale=40.0,
        prob_threshold=keys.get("prob_threshold", 0.0),
        area_threshold=None,
        short_side=short,
        slide_crop=keys.get("slide_crop", 336),
        slide_stride=112,
        background=_background(dataset, names_file),
        names_file=names_file,
        templates="imagenet",
        pamr=None,
        crop_remainder="pad",
        source=(
            f"{repo} configs/{config}:{lines} (name_path and model keys set)",
            f"{repo} configs/{config}:{resize_line} (Resize scale=(2048, {short}))",
            f"{repo} proxyclip_segmentor.py:30-31 (defaults: prob_thd=0.0, logit_scale=40, beta=1.2, gamma=3.0, "
            "slide_stride=112, slide_crop=336)",
            f"{repo} configs/base_config.py:2-8 (clip_type='openai', model_type='ViT-B/16', vfm_model='dino')",
            f"{repo} proxyclip_segmentor.py:188-244 (slide: windows padded to a multiple of 56, l. 218-223 and "
            "294-306), 246-265 (resize to the original size)",
            f"{repo} proxyclip_segmentor.py:267-292 (postprocess_result), 40 and 74 (fp16)",
            f"{repo} configs/{names} (class names, split on '; ': proxyclip_segmentor.py:329-340; "
            "openai_imagenet_template, l. 90)",
        ),
    )


#: ``(protocol, dataset) -> EvalProtocol`` for the 4 protocols x 8 benchmarks.
PRESETS: dict[tuple[str, str], EvalProtocol] = _build()


def get_protocol(name: str, dataset: str) -> EvalProtocol:
    """The preset of protocol ``name`` (``sclip | naclip | clearclip | proxyclip``) for ``dataset`` (a ``--dataset``
    key)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    if (name, dataset) not in PRESETS:
        configured = ", ".join(d for p, d in PRESETS if p == name)
        raise ValueError(f"protocol {name} does not configure dataset {dataset!r}; it configures: {configured}")
    return PRESETS[name, dataset]


# --------------------------------------------------------------------------------------------
# What --protocol still computes otherwise than the repositories


@dataclass(frozen=True)
class Difference:
    """One step where ``--protocol`` computes otherwise than the repositories, and what that does.

    ``effect`` is measured on the synthetic world with the demo CLIP by ``benchmarks/protocol_differences.py``
    (the presets scaled to a 64 px, patch-8 CLIP; 200 held-out scenes; mIoU over the six shapes, and the share
    of scored pixels whose label changes), or says why the synthetic world cannot show it.
    """

    step: str
    repositories: str
    engine: str
    effect: str


#: Every remaining difference between ``--protocol`` and the repositories' pipelines, with its measured effect
#: (``python -m benchmarks.protocol_differences --scenes 200``; JSON in ``benchmarks/results``). Settings of
#: the synthetic-world runs: SCLIP (short side 96, windows 64/32), NACLIP whole image and windows (96; 64/32;
#: PAMR), ClearCLIP (128; 128/64); mIoU under the engine's ``--protocol``: 0.285, 0.230, 0.234, 0.075 (ClearCLIP
#: at twice the demo CLIP's size is near chance, 0.090, so its rows say little). ProxyCLIP's effects are not
#: measured: the synthetic world trains no VFM, so a random one would measure noise.
DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        step="precision",
        repositories="CLIP in fp16 on CUDA (clip.load / create_model(precision='fp16')); SCLIP sums windows and "
        "post-processes in float32 (preds = img.new_zeros, clip_segmentor.py l. 98), NACLIP runs PAMR in float32 "
        "and the softmax in fp16 (naclip.py l. 132), ClearCLIP everything in fp16 from inputs.half() "
        "(clearclip_segmentor.py l. 208), ProxyCLIP CLIP and VFM in fp16 (proxyclip_segmentor.py l. 40, 74, 116), "
        "its affinities too; positional embeddings are resized in fp16",
        engine="the towers in the encoder's precision (float32 unless --dtype float16 --text-dtype float16); "
        "window sums, PAMR, softmax and thresholds in float32; positional embeddings resized in float32; "
        "ProxyCLIP's affinities (similarity, threshold, softmax) in float32 whatever the encoder's precision",
        effect="fp16 towers and fp16 cosines against float32: 0.03-0.15% of pixels change, mIoU within +0.0002",
    ),
    Difference(
        step="window averaging",
        repositories="each window's patch cosines upsampled (bilinear) to the window's pixels, summed into the "
        "canvas, divided by the count, then resized to the image (forward_slide, e.g. naclip.py l. 71-108, "
        "proxyclip_segmentor.py l. 188-244); a "
        "whole image is upsampled to the network input, then to the image",
        engine="windows averaged on the patch grid, upsampled once to the image (Segmenter._window_logits, the "
        "head's grid_extent mapping)",
        effect="with sides that are whole patches: 1.4-1.9% of pixels change with windows, 0.15% for NACLIP's "
        "whole image, 0% for one window; mIoU within 0.0007",
    ),
    Difference(
        step="pixels past the last whole patch, and where windows sit",
        repositories="windows placed on the resized image in pixels (the last one flush with its border); SCLIP "
        "and NACLIP let the stride-16 patch convolution drop a window's last H % 16 rows and W % 16 columns and "
        "stretch its logits over all its pixels; ClearCLIP pads each window to the patch multiple, centred, with "
        "zeros after normalisation, and crops the logits back (clearclip_segmentor.py l. 168-183); ProxyCLIP pads "
        "each window so, to a multiple of 56 (proxyclip_segmentor.py l. 218-231, 294-306), and its CLIP's stride-16 "
        "convolution then drops what is past a multiple of 16",
        engine="the resized image padded bottom and right to the patch multiple (zeros after normalisation; "
        "ProxyCLIP: to the lcm of both patch sizes, 16 with DINO ViT-B/8, 112 with DINOv2 ViT-B/14), windows on "
        "the grid of that canvas (crop_remainder records the repositories' way per preset)",
        effect="with sides of 12.5 patches (a remainder in every window): 12-24% of pixels change; mIoU -0.001 "
        "(SCLIP), +0.008 and +0.013 (NACLIP whole image, windows), -0.001 (ClearCLIP). Benchmark images whose "
        "resized sides are multiples of 16 (VOC's 500 x 375 at 336: 448 x 336) have none. ProxyCLIP's presets: "
        "every window is 336 x 336 (Cityscapes 224 x 224), a multiple of 56, 16 and 8, so no window is padded; "
        "its last window sits flush with the image where the engine's sits flush with the canvas (not measured: "
        "no VFM is trained in the synthetic world)",
    ),
    Difference(
        step="normalisation constants",
        repositories="SegDataPreProcessor(mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323]) on "
        "0..255 pixels (e.g. naclip.py l. 24, proxyclip_segmentor.py l. 33-37): CLIP's mean/std rounded to 3 "
        "decimals (ProxyCLIP then un-normalises with the exact ones and normalises with ImageNet's for the VFM, "
        "l. 79-80 and 113)",
        engine="(pixels / 255 - mean) / std with the CLIP's own mean/std (open_clip's, e.g. 0.48145466)",
        effect="no pixel changes in 200 scenes x 4 presets (the inputs differ by about 1e-5 relative)",
    ),
    Difference(
        step="decoding",
        repositories="mmcv LoadImageFromFile: OpenCV's decoder (BGR, turned to RGB by the data preprocessor)",
        engine="Pillow's decoder, EXIF orientation applied (images.load_image)",
        effect="not measurable on the synthetic world: its scenes are arrays, never encoded; JPEG decoders can "
        "differ by a unit in some pixels, and an EXIF-rotated photo would be read rotated otherwise",
    ),
    Difference(
        step="OpenCV build",
        repositories="cv2.resize from the OpenCV their environment installed (mmcv 2.x era, OpenCV 4)",
        engine="cv2.resize from opencv-python-headless as installed (any version >= 4.5)",
        effect="not measurable here: only OpenCV 5.1 was run (the tests hold the engine to it); results of "
        "other builds on uint8 images were not compared",
    ),
    Difference(
        step="ProxyCLIP: a crop whose affinities are all masked",
        repositories="every entry of a row of A = gamma * (S - beta * mean(S)) below 0 is set to -inf, so a row with "
        "none left (every similarity under beta * mean(S): a near-uniform crop, where mean(S) passes 1 / beta) is "
        "softmax(-inf...) = NaN, and so are that crop's logits (open_clip/transformer.py l. 573-578)",
        engine="such a row takes the softmax of its unmasked A (attention by similarity, as every other row); "
        "rows with an entry kept are the authors' exactly (pacl_fast.proxyclip.proxy_attention)",
        effect="none where the authors' output is defined; not measured on benchmarks (no VFM is trained in the "
        "synthetic world, and the weights cannot be downloaded here)",
    ),
    Difference(
        step="ProxyCLIP: square crops, batch of one",
        repositories="the VFM's grid is read from the crop's height for both sides (proxyclip_segmentor.py l. 149, "
        "158) and CLIP's values are reshaped as (W/16, H/16) (open_clip/transformer.py l. 521, 580); mean(S) is "
        "taken over the whole batch (l. 573), which is one crop",
        engine="each grid's own height and width; mean(S) per image, so a batch equals its images one by one",
        effect="none under the presets: every window is square and the authors run one crop at a time",
    ),
    Difference(
        step="PAMR out of memory",
        repositories="NACLIP catches a RuntimeError from PAMR (naclip.py l. 131-135) and keeps the unrefined "
        "logits for that image, with a warning",
        engine="pacl_fast.refine.pamr holds about three copies of the logits (never [B, C, P, H, W]); an error "
        "fails that image, which the report lists",
        effect="not measurable on the synthetic world (no image comes near the memory)",
    ),
)
