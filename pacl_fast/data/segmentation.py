"""Readers for the semantic-segmentation benchmarks, in the folder layouts that mmsegmentation and the
training-free CLIP segmentation papers (MaskCLIP, SCLIP, ClearCLIP, ProxyCLIP, NACLIP...) evaluate on.

=============  ===========================================================================  =======
``--dataset``  layout under ``--root`` (mmsegmentation's ``data/`` names)                   classes
=============  ===========================================================================  =======
voc21          ``VOC2012/JPEGImages/ID.jpg``, ``SegmentationClass/ID.png`` (palette,             21
               0 background, 255 border), ``ImageSets/Segmentation/val.txt``
voc20          as voc21; background becomes ignore (reduce-zero-label)                           20
context60      ``VOC2010/JPEGImages/ID.jpg``, ``SegmentationClassContext/ID.png``                60
               (0..59, 0 background; mmseg's converter), ``ImageSets/SegmentationContext``
context59      as context60; background becomes ignore (reduce-zero-label)                       59
cocostuff      ``coco_stuff164k/images/val2017/ID.jpg``, ``annotations/val2017/``               171
               ``ID_labelTrainIds.png`` (0..170, mmseg's converter) or the raw
               stuffthingmaps ``ID.png`` (COCO ids - 1, 0..181; mapped here to 0..170)
cocoobject     ``coco_object/`` (or ``coco_stuff164k/``) ``images/val2017/ID.jpg``,              81
               ``annotations/val2017/ID_instanceTrainIds.png`` (0 background, 1..80 things;
               SCLIP's ``datasets/cvt_coco_object.py``) or the raw stuffthingmaps ``ID.png``
               (mapped here the same way: things 1..80, stuff and unlabeled 0)
ade20k         ``ADEChallengeData2016/images/validation/ID.jpg``,                               150
               ``annotations/validation/ID.png`` (0 = other -> ignore: reduce-zero-label)
cityscapes     ``cityscapes/leftImg8bit/val/CITY/ID_leftImg8bit.png``,                           19
               ``gtFine/val/CITY/ID_gtFine_labelTrainIds.png`` (cityscapesscripts) or
               ``ID_gtFine_labelIds.png`` (mapped here to train ids)
synthetic      no files: held-out scenes of the synthetic world (``pacl_fast.data.synthetic``),   6
               background ignored; ``--split val`` (seed 1) or ``seedN``
=============  ===========================================================================  =======

``--root`` may name the dataset folder itself or a folder above it that holds it under the usual
name (``VOCdevkit/VOC2012``, ``coco_stuff164k``, ...). Ignore index 255 everywhere. Class names are
mmsegmentation's; :attr:`SegmentationDataset.prompts` holds the names the model is asked with
where they differ: for VOC, the training-free papers' list (SCLIP's ``configs/cls_voc21.txt``:
background asked as 26 kinds of stuff, synonyms for person and tv monitor).

The contract: adding a dataset is one reader class and one entry in :data:`DATASETS`. A reader is
built as ``cls(root, split)`` (``split=None``: its default split) and looks like::

    class MyDataset(SegmentationDataset):
        name = "mine"                       # the --dataset key
        classes = ("cat", "dog")            # class i is label value i in the masks returned
        prompts = None                      # or per-class synonyms to ask the model with
        ignore_index = 255                  # mask value that is not scored
        reduce_zero_label = False           # files store 0 = "other", classes from 1 (ADE20K)
        background_index = None             # class meaning "none of the others" (VOC21), if any
        layout = "what the folder holds"    # quoted in errors
        needs_root = True                   # False: made without files (root may be None)
        templates = None                    # prompt templates it is best asked with (None: caller's)

        def __len__(self) -> int: ...
        def __getitem__(self, index) -> tuple[image, mask]: ...
        def sample_id(self, index) -> str: ...   # stable name for logs and failure reports

``__getitem__`` returns ``image``, an ``HWC uint8`` array (anything ``Segmenter.predict`` takes),
and ``mask``, an ``[H, W]`` int64 array of class indices (``0..len(classes)-1``) or
``ignore_index``, of the image's size, with any id mapping and reduce-zero-label already
applied. Folder datasets subclass :class:`FolderDataset`, which does that from a list of
(id, image file, mask file) and checks every value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from pacl_fast.data import synthetic

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: SCLIP's VOC names (configs/cls_voc21.txt): background asked as stuff, a few classes with synonyms.
VOC_PROMPTS = (
    (
        "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
        "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
        "floor", "hill", "rail", "fence",
    ),
    ("aeroplane",), ("bicycle",), ("bird",), ("ship",), ("bottle",), ("bus",), ("car",), ("cat",), ("chair",),
    ("cow",), ("table",), ("dog",), ("horse",), ("motorbike",),
    (
        "person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
        "person in jacket",
    ),
    ("pottedplant",), ("sheep",), ("sofa",), ("train",),
    ("television monitor", "tv monitor", "monitor", "television", "screen"),
)  # fmt: skip

CONTEXT_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep",
    "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor",
    "wall", "water", "window", "wood",
)  # fmt: skip

COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
    "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip

#: Raw COCO-Stuff values (COCO category id - 1) that name no category: COCO's 11 retired thing ids.
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

#: COCO-Object (GroupViT, TCL, SCLIP's ``custom_datasets.py``): background, then COCO's 80 things.
COCO_OBJECT_CLASSES = ("background", *COCO_STUFF_CLASSES[:80])

#: SCLIP's COCO-Object names (``configs/cls_coco_object.txt``): background asked as the 26 kinds of stuff
#: of VOC, person with synonyms. The file also lists "bed" among the background names, which is
#: class 60's own name, so that bed could never win; it is left out of the background here. The
#: verbatim file is in ``pacl_fast/assets/class_names`` for ``--protocol sclip|naclip``.
COCO_OBJECT_PROMPTS = (
    tuple(name for name in VOC_PROMPTS[0] if name != "bed"),
    VOC_PROMPTS[15] + ("body",),
    *((name,) for name in COCO_STUFF_CLASSES[1:80]),
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: Cityscapes label id -> train id (cityscapesscripts' labels.py); every other id is ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def _lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry raw value -> class table; values not in ``mapping`` go to the ignore index."""
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for raw, label in mapping.items():
        table[raw] = label
    return table


#: Raw stuffthingmaps value -> 0..170, as mmsegmentation's tools/dataset_converters/coco_stuff164k.py.
COCO_STUFF_RAW_TO_TRAIN = _lookup_table(
    {raw: index for index, raw in enumerate(v for v in range(182) if v not in COCO_UNUSED_IDS)}
)
CITYSCAPES_RAW_TO_TRAIN = _lookup_table(CITYSCAPES_ID_TO_TRAIN_ID)
#: Raw stuffthingmaps value -> COCO-Object class, as SCLIP's datasets/cvt_coco_object.py: the 80 things
#: (raw 0..89) -> 1..80; stuff (raw 91..181) and unlabeled (255) -> 0, background. Retired ids are ignored.
COCO_OBJECT_RAW_TO_TRAIN = _lookup_table(
    {
        **{raw: 0 for raw in (*range(91, 182), IGNORE_INDEX)},
        **{raw: index + 1 for index, raw in enumerate(v for v in range(91) if v not in COCO_UNUSED_IDS)},
    }
)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as stored (no EXIF rotation: masks are drawn on the stored pixels), ``HWC uint8``."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode image file {path}: {error}") from error


def read_label_png(path: Path) -> np.ndarray:
    """A label map (palette or greyscale PNG of class values) as ``[H, W]`` int64."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(
                    f"mask {path} is a {image.mode} image; expected a single-channel label map of class values "
                    "(a palette or greyscale PNG), not a colour rendering"
                )
            return np.asarray(image, dtype=np.int64).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode mask file {path}: {error}") from error


class SegmentationDataset:
    """What the evaluator reads: class names and ``(image, mask)`` pairs (see the module docstring)."""

    name: ClassVar[str]
    classes: ClassVar[tuple[str, ...]]
    prompts: ClassVar[tuple[tuple[str, ...], ...] | None] = None
    ignore_index: ClassVar[int] = IGNORE_INDEX
    reduce_zero_label: ClassVar[bool] = False
    background_index: ClassVar[int | None] = None
    layout: ClassVar[str] = ""
    needs_root: ClassVar[bool] = True
    templates: ClassVar[tuple[str, ...] | None] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompt_names(self) -> tuple[tuple[str, ...], ...]:
        """Per-class names to ask the model with (:attr:`prompts`, else the class names)."""
        names = self.prompts or tuple((c,) for c in self.classes)
        if len(names) != len(self.classes):
            raise AssertionError(f"{self.name}: {len(names)} prompt lines for {len(self.classes)} classes")
        return names

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        raise NotImplementedError


class FolderDataset(SegmentationDataset):
    """A dataset on disk: a list of ``(id, image path, mask path, raw-value table or None)``.

    Subclasses set the class attributes, ``root_names`` (folder names the dataset usually sits
    under, tried below ``--root``), ``marker`` (a path that must exist in the dataset folder) and
    implement :meth:`list_samples`.
    """

    root_names: ClassVar[tuple[str, ...]] = ()
    marker: ClassVar[str] = ""
    default_split: ClassVar[str] = "val"

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.split = split or self.default_split
        self.root = self._find_root(Path(root).absolute())
        self.samples: list[tuple[str, Path, Path, np.ndarray | None]] = self.list_samples()
        if not self.samples:
            raise FileNotFoundError(
                f"{self.name}: no samples for split {self.split!r} under {self.root}; expected {self.layout}"
            )
        missing = [str(p) for _, image, mask, _ in self.samples for p in (image, mask) if not p.is_file()]
        if missing:
            shown = "\n  ".join(missing[:5])
            raise FileNotFoundError(
                f"{self.name}: {len(missing)} files of split {self.split!r} are missing, e.g.\n  {shown}\n"
                f"expected {self.layout}"
            )

    def _find_root(self, root: Path) -> Path:
        candidates = [root] + [root / name for name in self.root_names]
        for candidate in candidates:
            if (candidate / self.marker).exists():
                return candidate
        tried = ", ".join(str(c / self.marker) for c in candidates)
        if not root.exists():
            raise FileNotFoundError(f"{self.name}: dataset root {root} does not exist; expected {self.layout}")
        raise FileNotFoundError(
            f"{self.name}: {root} is not a {self.name} folder (tried {tried}); expected {self.layout}"
        )

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        raise NotImplementedError

    def require_folders(self, *folders: Path) -> None:
        """Name the first of ``folders`` that does not exist, with the layout expected."""
        for folder in folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"{self.name}: {folder} is missing; expected {self.layout}")

    def read_split_file(self, relative: str) -> list[str]:
        path = self.root / relative
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: split file {path} not found; expected {self.layout}")
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.samples)

    def sample_id(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        _, image_path, mask_path, table = self.samples[index]
        image = read_rgb(image_path)
        mask = self.decode_mask(read_label_png(mask_path), table, mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"{self.name}: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, mask

    def decode_mask(self, raw: np.ndarray, table: np.ndarray | None, path: Path) -> np.ndarray:
        """Raw file values -> class indices or ``ignore_index``; values that fit no class are errors."""
        mask = raw
        if table is not None:
            if raw.min() < 0 or raw.max() >= len(table):
                raise ValueError(f"{self.name}: mask {path} has values outside 0..{len(table) - 1}")
            mask = table[raw]
        if self.reduce_zero_label:
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
            mask[mask == self.ignore_index - 1] = self.ignore_index
        bad = np.unique(mask[(mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))])
        if bad.size:
            raise ValueError(
                f"{self.name}: mask {path} has label values {bad[:8].tolist()} outside 0..{self.num_classes - 1} "
                f"and not the ignore index {self.ignore_index}; expected {self.layout}"
            )
        return mask.astype(np.int64)


class PascalVOC21(FolderDataset):
    name = "voc21"
    classes = VOC_CLASSES
    prompts = VOC_PROMPTS
    background_index = 0
    root_names = ("VOC2012", "VOCdevkit/VOC2012")
    marker = "JPEGImages"
    layout = (
        "VOC2012/ with JPEGImages/ID.jpg, SegmentationClass/ID.png (palette PNG: 0 background, 1..20 classes, "
        "255 border) and ImageSets/Segmentation/SPLIT.txt"
    )

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        ids = self.read_split_file(f"ImageSets/Segmentation/{self.split}.txt")
        return [
            (i, self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png", None) for i in ids
        ]


class PascalVOC20(PascalVOC21):
    """VOC without its background class: background pixels are not scored (reduce-zero-label)."""

    name = "voc20"
    classes = VOC_CLASSES[1:]
    prompts = VOC_PROMPTS[1:]
    background_index = None
    reduce_zero_label = True


class PascalContext60(FolderDataset):
    name = "context60"
    classes = CONTEXT_CLASSES
    background_index = 0
    root_names = ("VOC2010", "VOCdevkit/VOC2010")
    marker = "SegmentationClassContext"
    layout = (
        "VOC2010/ with JPEGImages/ID.jpg, SegmentationClassContext/ID.png (values 0..59, 0 background, as "
        "written by mmsegmentation's pascal_context converter) and ImageSets/SegmentationContext/SPLIT.txt"
    )

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        ids = self.read_split_file(f"ImageSets/SegmentationContext/{self.split}.txt")
        return [
            (i, self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClassContext" / f"{i}.png", None)
            for i in ids
        ]


class PascalContext59(PascalContext60):
    """Pascal Context without its background class (reduce-zero-label)."""

    name = "context59"
    classes = CONTEXT_CLASSES[1:]
    background_index = None
    reduce_zero_label = True


def coco_samples(
    dataset: FolderDataset, converted_suffix: str, raw_table: np.ndarray
) -> list[tuple[str, Path, Path, np.ndarray | None]]:
    """COCO's ``images/SPLIT2017/ID.jpg`` with ``annotations/SPLIT2017/ID<converted_suffix>`` where a
    converter wrote one (it writes next to the raw maps, so both may exist: converted ones win), else
    the raw stuffthingmaps ``ID.png`` read through ``raw_table``."""
    folder = f"{dataset.split}2017"
    images_dir, masks_dir = dataset.root / "images" / folder, dataset.root / "annotations" / folder
    dataset.require_folders(images_dir, masks_dir)
    samples = []
    for image in sorted(images_dir.glob("*.jpg")):
        converted = masks_dir / f"{image.stem}{converted_suffix}"
        if converted.is_file():
            samples.append((image.stem, image, converted, None))
        else:
            samples.append((image.stem, image, masks_dir / f"{image.stem}.png", raw_table))
    return samples


class CocoStuff171(FolderDataset):
    name = "cocostuff"
    classes = COCO_STUFF_CLASSES
    root_names = ("coco_stuff164k",)
    marker = "images"
    layout = (
        "coco_stuff164k/ with images/SPLIT2017/ID.jpg and annotations/SPLIT2017/ID_labelTrainIds.png (0..170, "
        "255 unlabeled; mmsegmentation's coco_stuff164k converter) or the raw stuffthingmaps ID.png (0..181)"
    )

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        return coco_samples(self, "_labelTrainIds.png", COCO_STUFF_RAW_TO_TRAIN)


class CocoObject(FolderDataset):
    """COCO-Object: COCO-Stuff 164k's images with its 80 thing classes and everything else as background.

    Reads what SCLIP's (GroupViT's) ``datasets/cvt_coco_object.py`` writes, ``ID_instanceTrainIds.png``
    next to the raw maps (0 background, 1..80 things; stuff and unlabeled pixels are background, so
    nothing is ignored), or, where that file is absent, the raw stuffthingmaps ``ID.png`` mapped the
    same way. The papers evaluate COCO-Object with background (mmseg ``reduce_zero_label=False``).
    """

    name = "cocoobject"
    classes = COCO_OBJECT_CLASSES
    prompts = COCO_OBJECT_PROMPTS
    background_index = 0
    root_names = ("coco_object", "coco_stuff164k")
    marker = "images"
    layout = (
        "coco_object/ (or coco_stuff164k/) with images/SPLIT2017/ID.jpg and annotations/SPLIT2017/"
        "ID_instanceTrainIds.png (0 background, 1..80 things; SCLIP's datasets/cvt_coco_object.py) or the raw "
        "stuffthingmaps ID.png (0..181, 255 unlabeled)"
    )

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        return coco_samples(self, "_instanceTrainIds.png", COCO_OBJECT_RAW_TO_TRAIN)


class ADE20K(FolderDataset):
    name = "ade20k"
    classes = ADE20K_CLASSES
    reduce_zero_label = True
    root_names = ("ADEChallengeData2016", "ade/ADEChallengeData2016")
    marker = "annotations"
    layout = (
        "ADEChallengeData2016/ with images/validation/ID.jpg and annotations/validation/ID.png "
        "(0 other, 1..150 classes)"
    )
    _split_folders: ClassVar[dict[str, str]] = {"val": "validation", "train": "training"}

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        folder = self._split_folders.get(self.split, self.split)
        images_dir, masks_dir = self.root / "images" / folder, self.root / "annotations" / folder
        self.require_folders(images_dir)
        return [(p.stem, p, masks_dir / f"{p.stem}.png", None) for p in sorted(images_dir.glob("*.jpg"))]


class Cityscapes(FolderDataset):
    name = "cityscapes"
    classes = CITYSCAPES_CLASSES
    root_names = ("cityscapes",)
    marker = "leftImg8bit"
    layout = (
        "cityscapes/ with leftImg8bit/SPLIT/CITY/ID_leftImg8bit.png and gtFine/SPLIT/CITY/"
        "ID_gtFine_labelTrainIds.png (0..18, 255 ignore) or ID_gtFine_labelIds.png"
    )

    def list_samples(self) -> list[tuple[str, Path, Path, np.ndarray | None]]:
        images_dir = self.root / "leftImg8bit" / self.split
        self.require_folders(images_dir)
        samples = []
        for image in sorted(images_dir.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            masks = self.root / "gtFine" / self.split / image.parent.name
            train_ids = masks / f"{stem}_gtFine_labelTrainIds.png"
            if train_ids.is_file():
                samples.append((stem, image, train_ids, None))
            else:
                samples.append((stem, image, masks / f"{stem}_gtFine_labelIds.png", CITYSCAPES_RAW_TO_TRAIN))
        return samples


class SyntheticWorld(SegmentationDataset):
    """Held-out scenes of the synthetic world (``pacl_fast.data.synthetic``), made, not read.

    ``split`` names the world: ``val`` (seed 1, the validation seed; training uses seed 0) or
    ``seedN``; 500 scenes each (``--limit`` for fewer). Background pixels are ignored, so the
    mIoU is over the six shape classes (VOC20 / Context59 style). ``root`` is not used.
    """

    name = "synthetic"
    classes = synthetic.CLASS_NAMES
    ignore_index = synthetic.IGNORE_INDEX
    needs_root = False
    templates = synthetic.SYNTHETIC_TEMPLATES
    layout = "no files: split 'val' (seed 1) or 'seedN'"
    num_scenes: ClassVar[int] = 500

    def __init__(self, root: str | os.PathLike | None = None, split: str | None = None):
        self.split = split or "val"
        if self.split == "val":
            seed = 1
        elif self.split.startswith("seed") and self.split[4:].isdigit():
            seed = int(self.split[4:])
        else:
            raise ValueError(f"synthetic: split must be 'val' or 'seedN' (a world seed), got {self.split!r}")
        self.scenes = synthetic.SyntheticSegmentation(self.num_scenes, seed=seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.scenes[index]
        return image, mask.astype(np.int64)

    def sample_id(self, index: int) -> str:
        return f"{self.split}/{index}"


#: ``--dataset`` name -> reader class.
DATASETS: dict[str, type[SegmentationDataset]] = {
    cls.name: cls
    for cls in (
        PascalVOC21,
        PascalVOC20,
        PascalContext60,
        PascalContext59,
        CocoStuff171,
        CocoObject,
        ADE20K,
        Cityscapes,
        SyntheticWorld,
    )
}


def open_dataset(name: str, root: str | os.PathLike | None, split: str | None = None) -> SegmentationDataset:
    """The reader for ``name`` (a key of :data:`DATASETS`) over the folder ``root``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    reader = DATASETS[name]
    if root is None and reader.needs_root:
        raise ValueError(f"dataset {name} reads files: give its folder (--root); expected {reader.layout}")
    return reader(root, split)
