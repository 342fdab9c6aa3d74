"""Where int8 calibration images come from, and the model inputs made from them.

``Calibration.resolve("synthetic" | folder, count)`` checks the source and picks the images (spread
over a folder's sorted listing); :class:`CalibrationImages` turns them into model inputs on demand,
cropped and normalised as the encoder's inputs are. Used by the OpenVINO encoder's NNCF quantisation
(:mod:`pacl_fast.encoders.openvino_encoder`), which keys its cache by :meth:`Calibration.slug`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pacl_fast.encoders.artifacts import short_digest
from pacl_fast.images import IMAGE_SUFFIXES, cover_crop, load_image, normalize

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SIZE = 300
#: The synthetic world's training seed: calibration scenes are training scenes, never the held-out ones (seed 1).
SYNTHETIC_CALIBRATION_SEED = 0


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, :data:`~pacl_fast.images.IMAGE_SUFFIXES`, hidden ones skipped), sorted.

    Raises FileNotFoundError / ValueError naming the folder when it is missing, not a folder or unreadable.
    """
    if not folder.exists():
        raise FileNotFoundError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"calibration must be 'synthetic' or a folder of images; {folder} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(f"calibration folder {folder} is not readable")

    def fail(error: OSError) -> None:
        raise ValueError(f"calibration folder {folder} cannot be read: {error}") from error

    found = []
    for directory, subdirectories, files in os.walk(folder, onerror=fail):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [
            Path(directory, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


@dataclass(frozen=True)
class Calibration:
    """Where int8 calibration images come from: ``"synthetic"`` scenes or a folder, and how many.

    ``files`` (folders only) are the images used: ``count`` spread evenly over the sorted listing,
    so a folder of class subfolders contributes from each. ``slug`` names the cache folder.
    """

    source: str  # "synthetic" or the folder's path
    count: int
    files: tuple[Path, ...] = ()

    @classmethod
    def resolve(cls, calibration: str | os.PathLike, count: int) -> Calibration:
        """Check ``calibration`` (``"synthetic"`` or a folder) and pick its ``count`` images."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"calibration_size must be a positive integer, got {count!r}")
        if isinstance(calibration, str) and calibration == "synthetic":
            return cls("synthetic", count)
        if not isinstance(calibration, (str, os.PathLike)):
            raise TypeError(f"calibration must be 'synthetic' or a folder path, got {type(calibration).__name__}")
        folder = Path(calibration)
        files = list_images(folder)
        if not files:
            raise ValueError(
                f"calibration folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)"
            )
        if len(files) < count:
            logger.warning(
                "calibration folder %s holds %d images, fewer than calibration_size=%d: using them all",
                folder,
                len(files),
                count,
            )
        chosen = [files[i * len(files) // count] for i in range(count)] if len(files) > count else files
        return cls(str(folder), len(chosen), tuple(chosen))

    @property
    def kind(self) -> str:
        return "synthetic" if self.source == "synthetic" else "images"

    def describe(self) -> dict:
        """What defines the calibration set (keys the cache); folders by their files' names, sizes and times."""
        if self.kind == "synthetic":
            return {"source": "synthetic", "seed": SYNTHETIC_CALIBRATION_SEED, "count": self.count}
        root = Path(self.source)
        files = []
        for path in self.files:
            stat = path.stat()
            files.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
        return {"source": "images", "count": self.count, "files": files}

    def slug(self, quantizer: dict) -> str:
        """``synthetic300-<hash>`` / ``images300-<hash>``: the int8 cache folder's suffix, keyed by this set
        and ``quantizer`` (what else defines the quantised model: the quantizer's version and settings)."""
        digest = short_digest({**self.describe(), **quantizer})
        return f"{self.kind}{self.count}-{digest}"


class CalibrationImages:
    """The calibration set for one input size: model inputs ``[1, 3, H, W]`` float32 numpy arrays, made on demand.

    NNCF iterates over it more than once (statistics, SmoothQuant, bias correction), so images
    are decoded per pass instead of holding hundreds of them in memory. Folder images that
    cannot be decoded are dropped (each named in a warning) when the set is made; none left is an error.
    """

    def __init__(
        self,
        calibration: Calibration,
        size: tuple[int, int],
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        progress: bool = True,
    ):
        from tqdm.auto import tqdm

        self.calibration, self.size, self.image_size, self.mean, self.std = calibration, size, image_size, mean, std
        self.items: list[int | Path] = list(range(calibration.count))
        if calibration.kind == "images":
            self.items = []
            for path in tqdm(calibration.files, desc="calibration images", unit="image", disable=not progress):
                try:
                    load_image(path)
                except (FileNotFoundError, ValueError, TypeError, OSError) as error:
                    logger.warning("calibration: skipping %s: %s", path, error)
                    continue
                self.items.append(path)
            if not self.items:
                raise ValueError(
                    f"calibration folder {calibration.source}: none of its {calibration.count} chosen images could be "
                    f"decoded (first: {calibration.files[0]})"
                )

    def __len__(self) -> int:
        return len(self.items)

    def image(self, item: int | Path) -> torch.Tensor:
        """RGB ``[3, h, w]`` uint8 of one item: a decoded file, or a training scene at the CLIP's native size."""
        if isinstance(item, Path):
            return load_image(item)
        from pacl_fast.data.synthetic import WorldConfig, render_scene

        scene = render_scene(item, SYNTHETIC_CALIBRATION_SEED, WorldConfig(image_size=self.image_size))
        return torch.from_numpy(scene.image).permute(2, 0, 1)

    def input(self, item: int | Path) -> np.ndarray:
        """The model input ``[1, 3, H, W]`` float32 of one item (see the module docstring)."""
        pixels = normalize(cover_crop(self.image(item), self.size), self.mean, self.std)
        return pixels[None].contiguous().numpy()

    def __iter__(self) -> Iterator[np.ndarray]:
        for item in self.items:
            yield self.input(item)
