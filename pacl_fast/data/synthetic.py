"""The synthetic scene world (DESIGN §7): procedural scenes, partial captions, exact masks.

No dataset can be downloaded here, so the project makes its own. A scene is a textured, noisy
background with 1-4 overlapping objects. Each object belongs to one of six *shape classes*
(circle, square, triangle, diamond, cross, star) and is painted in one of six colours. As real
categories do (a zebra's stripes, grass's blades), each class also has its own surface pattern,
visible inside a single patch: shape alone is invisible within an 8x8 patch, and a world whose
classes cannot be told apart locally cannot be segmented from patch tokens by anyone.

Captions name a random non-empty subset of the visible objects ("a red circle and a blue
square.", sometimes just "a circle."), as real captions do; colours are named only sometimes.
Masks are exact: the class of the topmost object per pixel, ``IGNORE_INDEX`` on background.

Everything is a pure function of ``(seed, index)``: :func:`render_scene` makes scene ``index``;
:class:`SyntheticScenes` streams them without end, sharded across DDP ranks and DataLoader
workers so that every scene is used once and a run can resume at any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pacl_fast.data.stream import PairStream

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
PATTERNS: tuple[str, ...] = ("dots", "checks", "diagonal stripes", "horizontal stripes", "grid", "vertical stripes")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
IGNORE_INDEX = 255

#: Prompt templates for segmenting this world: class names with and without each colour.
SYNTHETIC_TEMPLATES: tuple[str, ...] = ("a {}.", "a photo of a {}.") + tuple(f"a {c} {{}}." for c in COLOUR_NAMES)


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. Sizes are fractions of the image side so worlds scale with it."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.3  # object bounding size, fraction of the image side
    max_size: float = 0.6
    colour_in_caption: float = 0.7  # probability that an object's colour is named
    min_visible: float = 0.3  # an object is captionable when this share of it is unoccluded
    noise: float = 12.0  # std of per-pixel noise, in 0..255 units


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    mask: np.ndarray  # [H, W] uint8: class index, IGNORE_INDEX on background
    caption: str
    objects: list[tuple[int, str]]  # (class index, colour name), bottom to top


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, size: float, angle: float) -> np.ndarray:
    """Pixels inside shape ``kind`` centred at the origin, bounding size ``size``, rotated ``angle``."""
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * xx + sin * yy, -sin * xx + cos * yy
    r = size / 2
    name = CLASS_NAMES[kind]
    if name == "circle":
        return u**2 + v**2 <= r**2
    if name == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if name == "triangle":  # pointing up in the rotated frame
        return (v <= r * 0.7) & (v >= -r + 1.7 * np.abs(u))
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if name == "cross":
        arm = r * 0.38
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    # star: five points, radius oscillating between the inner and outer radius
    theta = np.arctan2(v, u)
    radius = r * (0.7 + 0.3 * np.cos(5 * theta))
    return u**2 + v**2 <= radius**2


def _pattern(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class ``kind``'s surface pattern in 0..1, with a random phase and a slightly jittered period."""
    period = rng.uniform(3.6, 4.4)
    py, px = rng.uniform(0, period, size=2)
    y, x = (yy + py) / period, (xx + px) / period
    name = PATTERNS[kind]
    if name == "dots":
        return (((y % 1) - 0.5) ** 2 + ((x % 1) - 0.5) ** 2 < 0.09).astype(np.float32)
    if name == "checks":
        return ((np.floor(y * 1.3) + np.floor(x * 1.3)) % 2).astype(np.float32)
    if name == "diagonal stripes":
        return (((x + y) % 1) < 0.5).astype(np.float32)
    if name == "horizontal stripes":
        return ((y % 1) < 0.5).astype(np.float32)
    if name == "grid":
        return (((y % 1) < 0.3) | ((x % 1) < 0.3)).astype(np.float32)
    return ((x % 1) < 0.5).astype(np.float32)  # vertical stripes


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Cloudy low-frequency colour field: bilinear upsampling of a random 4x4 colour grid."""
    coarse = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.float32)
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    t = np.linspace(0, 3, size, dtype=np.float32)
    i0 = np.minimum(t.astype(int), 2)
    f = (t - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # [size, 4, 3]
    field = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # [size, size, 3]
    return field * tint


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_scene(index: int, seed: int = 0, config: WorldConfig = WorldConfig()) -> Scene:
    """Scene ``index`` of the world with ``seed``: the same arguments always give the same scene."""
    rng = np.random.default_rng([seed, index])
    size = config.image_size
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    image = _background(size, rng)
    mask = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int8)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects, areas = [], []
    for slot in range(count):
        kind = int(rng.integers(len(CLASS_NAMES)))
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        extent = rng.uniform(config.min_size, config.max_size) * size
        cy, cx = rng.uniform(extent * 0.35, size - extent * 0.35, size=2)
        inside = _shape_mask(kind, yy - cy, xx - cx, extent, rng.uniform(-0.35, 0.35))
        pattern = _pattern(kind, yy, xx, rng)
        shade = np.asarray(COLOURS[colour], dtype=np.float32) * rng.uniform(0.85, 1.1)
        painted = shade * (0.45 + 0.55 * pattern[..., None])
        image = np.where(inside[..., None], painted, image)
        mask[inside] = kind
        owner[inside] = slot
        objects.append((kind, colour))
        areas.append(int(inside.sum()))
    image += rng.normal(0.0, config.noise, size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).round().astype(np.uint8)

    visible = np.bincount(owner[owner >= 0], minlength=count)
    captionable = [s for s in range(count) if areas[s] and visible[s] >= config.min_visible * areas[s]]
    if not captionable:  # every object mostly hidden: caption the topmost one
        captionable = [count - 1]
    chosen = rng.permutation(captionable)[: int(rng.integers(1, len(captionable) + 1))]
    phrases = []
    for slot in sorted(chosen):
        kind, colour = objects[slot]
        words = f"{colour} {CLASS_NAMES[kind]}" if rng.random() < config.colour_in_caption else CLASS_NAMES[kind]
        phrases.append(f"{_article(words)} {words}")
    opening = ("", "a photo of ", "an image of ", "a picture with ")[int(rng.integers(4))]
    caption = f"{opening}{' and '.join(phrases)}."  # e.g. "a photo of a red circle and a star."
    return Scene(image=image, mask=mask, caption=caption, objects=objects)


class SyntheticPairs:
    """The world as an endless :class:`~pacl_fast.data.stream.PairSource`: item ``i`` is scene ``i``."""

    size = None

    def __init__(self, seed: int = 0, config: WorldConfig = WorldConfig()):
        self.seed, self.config = seed, config

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        scene = render_scene(index, self.seed, self.config)
        return torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(), scene.caption


class SyntheticScenes(PairStream):
    """An endless ``IterableDataset`` of ``(image [3, H, W] uint8, caption, 0)`` scenes.

    Sharded as :class:`~pacl_fast.data.stream.PairStream` is: step ``s`` of rank ``r`` uses
    scenes ``[(s * world_size + r) * batch_size, ... + batch_size)``, whatever the number of
    DataLoader workers, so no scene repeats and a resumed run sees what an uninterrupted one would.
    """

    def __init__(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        config: WorldConfig = WorldConfig(),
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        super().__init__(
            SyntheticPairs(seed, config), batch_size, seed=seed, rank=rank, world_size=world_size, start_step=start_step
        )


class SyntheticSegmentation:
    """A fixed set of scenes with masks, for evaluation: ``dataset[i] -> (image HWC uint8, mask HW uint8)``.

    Use a seed never used in training (training uses ``seed=0`` by default; validation ``seed=1``).
    """

    class_names = CLASS_NAMES
    ignore_index = IGNORE_INDEX
    reduce_zero_label = False

    def __init__(self, num_images: int = 500, *, seed: int = 1, config: WorldConfig = WorldConfig()):
        self.num_images, self.seed, self.config = num_images, seed, config

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"scene {index} is outside 0..{self.num_images - 1}")
        scene = render_scene(index, self.seed, self.config)
        return scene.image, scene.mask
