"""``pacl-fast demo``: segment fresh synthetic scenes with the weights shipped in the package.

The package carries a CLIP trained from scratch on the synthetic world and PACL weights trained
on top of it (``train/make_demo_weights.sh`` reproduces both). The demo renders scenes the
training never saw, segments them with the shape names as labels, writes overlays next to the
ground truth, and reports the mIoU over the shape classes (background ignored); the command prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pacl_fast.build import DEMO
from pacl_fast.data.synthetic import CLASS_NAMES, IGNORE_INDEX, SYNTHETIC_TEMPLATES, WorldConfig, render_scene
from pacl_fast.metrics import SegmentationMetrics, confusion_matrix
from pacl_fast.results import palette
from pacl_fast.segmenter import Segmenter

DEMO_SEED = 100  # training uses world seed 0, validation 1, the probes 2

#: A tiny ViT CLIP (patch 8, 64 px) for tests.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def demo_segmenter(device: str = "cpu") -> Segmenter:
    """The shipped synthetic-world CLIP + PACL (``clip="demo"``)."""
    return Segmenter(DEMO, device=device)


#: Demo pictures are upscaled this much (nearest neighbour): scenes are 64 px, too small to read.
DEMO_ZOOM = 4
IGNORED_GREY = (110, 110, 110)


def _colour_labels(labels: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """``[H, W]`` class indices -> ``HWC`` colours; pixels that are not scored are grey."""
    colours = palette(len(CLASS_NAMES))[np.clip(labels, 0, len(CLASS_NAMES) - 1)]
    colours[~scored] = IGNORED_GREY
    return colours


def demo_panel(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray, zoom: int = DEMO_ZOOM) -> Image.Image:
    """Photo | prediction | ground truth, upscaled, with a legend of class names and colours.

    Background pixels are not scored (ignore index in the ground truth), so both maps show them
    grey, as the mIoU sees them.
    """
    from PIL import ImageDraw

    scored = truth != IGNORE_INDEX
    height, width = truth.shape
    tiles = [image, _colour_labels(prediction, scored), _colour_labels(truth, scored)]
    big = [Image.fromarray(t).resize((width * zoom, height * zoom), Image.NEAREST) for t in tiles]
    gap, row = 8, 18
    entries = [(name, tuple(int(c) for c in colour)) for name, colour in zip(CLASS_NAMES, palette(len(CLASS_NAMES)))]
    entries.append(("background (not scored)", IGNORED_GREY))
    title_height = row + 4
    legend_height = row * ((len(entries) + 2) // 3) + gap
    panel = Image.new("RGB", (3 * width * zoom + 4 * gap, title_height + height * zoom + legend_height + gap), "white")
    draw = ImageDraw.Draw(panel)
    for column, (tile, title) in enumerate(zip(big, ("photo", "prediction", "ground truth"))):
        left = gap + column * (width * zoom + gap)
        draw.text((left, 4), title, fill="black")
        panel.paste(tile, (left, title_height))
    top = title_height + height * zoom + gap
    column_width = (panel.width - 2 * gap) // 3
    for index, (name, colour) in enumerate(entries):
        left, y = gap + (index % 3) * column_width, top + (index // 3) * row
        draw.rectangle((left, y + 2, left + 12, y + 14), fill=colour, outline="black")
        draw.text((left + 18, y + 2), name, fill="black")
    return panel


@dataclass
class DemoReport:
    """What :func:`run_demo` did: each scene's objects and accuracy, the metrics over all, where the pictures are."""

    scenes: list[tuple[str, float]]  # (objects, fraction of object pixels right), one per scene
    metrics: SegmentationMetrics
    seed: int
    out_dir: Path

    def summary(self) -> str:
        """A line per scene, the per-class table and the mIoU, as ``pacl-fast demo`` prints them."""
        lines = [f"scene{i} ({objects}): {accuracy:.0%} of object pixels right" for i, (objects, accuracy)
                 in enumerate(self.scenes)]  # fmt: skip
        lines.append(self.metrics.table())
        lines.append(
            f"mIoU over {len(self.scenes)} fresh scenes (seed {self.seed}): {self.metrics.miou:.3f}; "
            f"pictures in {self.out_dir}/sceneN.png"
        )
        return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "pacl-demo",
    num_images: int = 8,
    seed: int = DEMO_SEED,
    segmenter: Segmenter | None = None,
) -> DemoReport:
    """Segment ``num_images`` fresh scenes with ``segmenter`` (default :func:`demo_segmenter`); write
    ``sceneN.png`` (photo | prediction | truth, with a legend), ``sceneN_labels.png`` and
    ``sceneN_overlay.png``; return what was scored (the command prints :meth:`DemoReport.summary`)."""
    segmenter = segmenter or demo_segmenter()
    scenes = [render_scene(i, seed, WorldConfig(image_size=segmenter.image_size)) for i in range(num_images)]
    # No background threshold: the mIoU scores shape pixels only (background is ignored, as eval does on synthetic).
    results = segmenter.predict(
        [s.image for s in scenes], CLASS_NAMES, templates=SYNTHETIC_TEMPLATES, background_threshold=0.0
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = 0
    scored = []
    for index, (scene, result) in enumerate(zip(scenes, results)):
        result.save(out_dir, stem=f"scene{index}", overwrite=True)
        demo_panel(scene.image, result.labels, scene.mask).save(out_dir / f"scene{index}.png")
        scene_confusion = confusion_matrix(result.labels, scene.mask, len(CLASS_NAMES), IGNORE_INDEX)
        confusion = confusion + scene_confusion
        accuracy = SegmentationMetrics(CLASS_NAMES, scene_confusion.numpy()).aacc
        scored.append((", ".join(f"{colour} {CLASS_NAMES[kind]}" for kind, colour in scene.objects), accuracy))
    metrics = SegmentationMetrics(CLASS_NAMES, confusion.numpy())
    return DemoReport(scored, metrics, seed, out_dir)
