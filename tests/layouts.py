"""Writers of tiny benchmark folders in each layout that ``pacl_fast.data.segmentation`` reads.

Each writer takes raw masks (the values as the dataset stores them) and writes random images of
the same size plus the split files, so tests can compare what the reader returns with what was
written. Nothing here knows the reader's mappings: tests state the expected classes themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pacl_fast.results import palette


def random_image(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    """A VOC-style palette PNG: indices are the values, colours for the eye."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:255] = palette(255)
    colours[255] = (224, 224, 192)  # VOC's border colour
    image.putpalette(colours.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_grey_png(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def save_image(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(image).save(path)


def write_voc(root: Path, masks: dict[str, np.ndarray], split: str = "val") -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages, SegmentationClass (palette), ImageSets/Segmentation."""
    voc = root / "VOCdevkit" / "VOC2012"
    for seed, (name, mask) in enumerate(masks.items()):
        save_image(random_image(mask.shape, seed), voc / "JPEGImages" / f"{name}.jpg")
        save_palette_png(mask, voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in masks))
    return voc


def write_context(root: Path, masks: dict[str, np.ndarray], split: str = "val") -> Path:
    """``root/VOCdevkit/VOC2010`` with SegmentationClassContext (0..59) and ImageSets/SegmentationContext."""
    voc = root / "VOCdevkit" / "VOC2010"
    for seed, (name, mask) in enumerate(masks.items()):
        save_image(random_image(mask.shape, seed), voc / "JPEGImages" / f"{name}.jpg")
        save_grey_png(mask, voc / "SegmentationClassContext" / f"{name}.png")
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("".join(f"{n}\n" for n in masks))
    return voc


def write_coco_stuff(root: Path, masks: dict[str, np.ndarray], *, converted: bool) -> Path:
    """``root/coco_stuff164k``: images/val2017 and annotations/val2017 (``_labelTrainIds`` or raw)."""
    coco = root / "coco_stuff164k"
    for seed, (name, mask) in enumerate(masks.items()):
        save_image(random_image(mask.shape, seed), coco / "images" / "val2017" / f"{name}.jpg")
        suffix = "_labelTrainIds.png" if converted else ".png"
        save_grey_png(mask, coco / "annotations" / "val2017" / f"{name}{suffix}")
    return coco


def write_ade(root: Path, masks: dict[str, np.ndarray]) -> Path:
    """``root/ADEChallengeData2016``: images/validation, annotations/validation (0 = other)."""
    ade = root / "ADEChallengeData2016"
    for seed, (name, mask) in enumerate(masks.items()):
        save_image(random_image(mask.shape, seed), ade / "images" / "validation" / f"{name}.jpg")
        save_grey_png(mask, ade / "annotations" / "validation" / f"{name}.png")
    return ade


def write_cityscapes(root: Path, masks: dict[str, np.ndarray], *, train_ids: bool) -> Path:
    """``root/cityscapes``: leftImg8bit/val/CITY and gtFine/val/CITY (labelTrainIds or labelIds)."""
    city = root / "cityscapes"
    for seed, (name, mask) in enumerate(masks.items()):
        town = name.split("_")[0]
        save_image(random_image(mask.shape, seed), city / "leftImg8bit" / "val" / town / f"{name}_leftImg8bit.png")
        kind = "labelTrainIds" if train_ids else "labelIds"
        save_grey_png(mask, city / "gtFine" / "val" / town / f"{name}_gtFine_{kind}.png")
    return city


def write_tiny_clip(folder: Path, config: dict, seed: int = 0) -> Path:
    """A random tiny CLIP in open_clip's local-dir layout, so that separate processes load the same weights."""
    import torch
    from helpers import quiet_load_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.manual_seed(seed)
    state = quiet_load_clip(config).clip.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def write_tiny_pacl(clip_folder: Path, path: Path, seed: int = 1) -> Path:
    """PACL weights paired with the CLIP in ``clip_folder`` (its MLP branch made non-trivial)."""
    import torch
    from helpers import quiet_load_clip

    from pacl_fast.model import PACL
    from pacl_fast.weights import save_pacl_weights

    torch.manual_seed(seed)
    model = PACL(quiet_load_clip(f"local-dir:{clip_folder}"))
    torch.nn.init.normal_(model.embedder.fc2.weight, std=0.05)
    return save_pacl_weights(model, path)


def write_coco_object(
    root: Path, masks: dict[str, np.ndarray], *, converted: bool, folder: str = "coco_object", split: str = "val2017"
) -> Path:
    """``root/<folder>``: images/SPLIT, annotations/SPLIT with ``ID_instanceTrainIds.png`` or the raw ``ID.png``."""
    coco = root / folder
    for seed, (name, mask) in enumerate(masks.items()):
        save_image(random_image(mask.shape, seed), coco / "images" / split / f"{name}.jpg")
        suffix = "_instanceTrainIds.png" if converted else ".png"
        save_grey_png(mask, coco / "annotations" / split / f"{name}{suffix}")
    return coco
