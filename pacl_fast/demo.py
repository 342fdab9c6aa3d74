"""``pacl-fast demo``: segment a few generated scenes end to end with an embedded default model.

Until trained demo weights ship with the package, the demo runs a randomly initialised tiny
CLIP + PACL and says so plainly: it shows the pipeline working, not segmentation quality.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pacl_fast.backbone import RandomWeightsWarning
from pacl_fast.segmenter import Segmenter

#: A tiny ViT CLIP (patch 8, 64 px) for tests and the untrained demo.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

DEMO_LABELS = ("circle", "square", "triangle")


def _scene(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A noisy background with one filled circle, square and triangle: ``HWC uint8``."""
    image = rng.integers(80, 140, size=(size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(20, size - 20, size=2)
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < 14**2] = (220, 40, 40)
    y0, x0 = rng.integers(0, size - 24, size=2)
    image[y0 : y0 + 24, x0 : x0 + 24] = (40, 200, 60)
    ty, tx = rng.integers(0, size - 26, size=2)
    triangle = (yy - ty >= 0) & (yy - ty < 26) & (np.abs(xx - tx - 13) <= (yy - ty) / 2)
    image[triangle] = (50, 70, 220)
    return image


def run_demo(out_dir: str | Path = "pacl-demo", num_images: int = 3, seed: int = 0) -> list[Path]:
    """Segment ``num_images`` generated scenes, write overlays to ``out_dir``, print class shares."""
    print(
        "NOTE: no trained demo weights are installed, so this demo runs a RANDOMLY INITIALISED tiny "
        "CLIP + PACL. It shows the pipeline end to end; the segmentations are meaningless."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        segmenter = Segmenter(TINY_CLIP_CONFIG, device="cpu")
    rng = np.random.default_rng(seed)
    images = [_scene(rng) for _ in range(num_images)]
    results = segmenter.predict(images, DEMO_LABELS, templates="single")
    out_dir = Path(out_dir)
    written = []
    for index, result in enumerate(results):
        paths = result.save(out_dir, stem=f"scene{index}")
        written.extend(paths.values())
        shares = ", ".join(f"{name} {share:.0%}" for name, share in result.class_shares().items())
        print(f"scene{index}: {shares} -> {paths['overlay']}")
    return written
