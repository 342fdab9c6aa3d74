import re

import numpy as np
import pytest
from torch.utils.data import DataLoader

from pacl_fast.data.stream import collate_pairs
from pacl_fast.data.synthetic import (
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOURS,
    IGNORE_INDEX,
    SyntheticScenes,
    SyntheticSegmentation,
    WorldConfig,
    _shape_mask,
    render_scene,
)


def test_world_draws_six_shapes_in_six_colours():
    """Scenes use every shape class and every colour, at least six of each (DESIGN §7), colours distinct."""
    kinds, colours = set(), set()
    for index in range(60):
        scene = render_scene(index, seed=5)
        kinds |= {kind for kind, _ in scene.objects}
        colours |= {colour for _, colour in scene.objects}
    assert kinds == set(range(len(CLASS_NAMES))) and len(kinds) >= 6
    assert colours == set(COLOUR_NAMES) and len(set(COLOURS.values())) == len(colours) >= 6


def test_deterministic_by_seed_and_index():
    a, b = render_scene(17, seed=3), render_scene(17, seed=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert not np.array_equal(render_scene(17, seed=4).image, a.image)
    assert not np.array_equal(render_scene(18, seed=3).image, a.image)


def test_scenes_objects_masks_and_partial_captions():
    counts, partial, coloured, bare = set(), 0, 0, 0
    for index in range(200):
        scene = render_scene(index, seed=5)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 4
        counts.add(len(scene.objects))
        present = set(np.unique(scene.mask)) - {IGNORE_INDEX}
        assert present <= {kind for kind, _ in scene.objects}
        assert (scene.mask == IGNORE_INDEX).any()  # background is visible
        mentioned = re.findall(r"\b(?:a|an) (?:(\w+) )?(" + "|".join(CLASS_NAMES) + r")\b", scene.caption)
        assert mentioned, scene.caption
        for colour, shape in mentioned:
            kinds = [c for k, c in scene.objects if CLASS_NAMES[k] == shape]
            assert kinds, f"{scene.caption!r} names a {shape} that is not in the scene"
            if colour in COLOUR_NAMES:
                assert colour in kinds
                coloured += 1
            else:
                bare += 1
        partial += len(mentioned) < len(scene.objects)
    assert counts == {1, 2, 3, 4}
    assert partial > 40 and coloured > 0 and bare > 0  # captions name some objects, colours only sometimes


def colour_fits(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Which noise-free pixels ``[N, 3]`` could have been painted in ``colour``: objects are painted
    ``colour * shade * (0.45 or 1.0)`` with ``shade`` in ``[0.85, 1.1]``, then clipped to 255 and rounded.
    So a pixel fits when one factor ``m`` in ``[0.85 * 0.45, 1.1]`` explains all three channels (each
    within rounding, or clipped at 255)."""
    base = np.asarray(colour, dtype=np.float64)  # [3]
    low = np.where(pixels >= 255, 254.5, pixels - 0.5) / base  # [N, 3]: bounds on m from each channel
    high = np.where(pixels >= 255, np.inf, pixels + 0.5) / base
    low = np.maximum(low.max(axis=1), 0.85 * 0.45)
    high = np.minimum(high.min(axis=1), 1.1)
    return low <= high + 1e-9


def test_masks_are_exact_topmost_object():
    """With no noise, every pixel the mask gives to class k has the colour of a class-k object (so a mask
    that kept an occluded object's label, or labelled the wrong class, fails), and the topmost object shows."""
    config = WorldConfig(noise=0.0)
    checked, seen = 0, set()
    for index in range(40):
        scene = render_scene(index, seed=9, config=config)
        assert set(np.unique(scene.mask)) - {IGNORE_INDEX} <= {kind for kind, _ in scene.objects}
        for kind in set(np.unique(scene.mask)) - {IGNORE_INDEX}:
            pixels = scene.image[scene.mask == kind].astype(np.float64)  # [N, 3]
            fits = np.zeros(len(pixels), dtype=bool)
            for object_kind, colour in scene.objects:
                if object_kind == kind:
                    fits |= colour_fits(pixels, COLOURS[colour])
            wrong = int((~fits).sum())
            assert not wrong, f"scene {index}: {wrong} of {len(pixels)} class-{kind} pixels lack a class-{kind} colour"
            checked += len(pixels)
            seen.add(kind)
        # The topmost object is drawn last and nothing hides it: its label and colour are in the scene.
        top_kind, top_colour = scene.objects[-1]
        assert colour_fits(scene.image[scene.mask == top_kind].astype(np.float64), COLOURS[top_colour]).any()
    assert checked > 20_000 and seen == set(range(len(CLASS_NAMES)))


def test_shape_areas_are_right():
    coords = np.arange(200) + 0.5 - 100
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    circle = _shape_mask(CLASS_NAMES.index("circle"), yy, xx, size=100, angle=0.0)
    assert circle.sum() == pytest.approx(np.pi * 50**2, rel=0.01)
    diamond = _shape_mask(CLASS_NAMES.index("diamond"), yy, xx, size=100, angle=0.0)
    assert diamond.sum() == pytest.approx(2 * 50**2, rel=0.03)


def _captions(stream, workers, steps):
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=collate_pairs)
    batches = []
    for batch in loader:
        batches.append(tuple(batch["captions"]) + (batch["images"].sum().item(),))
        if len(batches) == steps:
            break
    return batches


def test_stream_shards_ranks_and_workers_without_repeats_and_resumes():
    single = _captions(SyntheticScenes(4, seed=2), workers=0, steps=6)
    with_workers = _captions(SyntheticScenes(4, seed=2), workers=2, steps=6)
    assert single == with_workers  # the data does not depend on the number of workers
    resumed = _captions(SyntheticScenes(4, seed=2, start_step=3), workers=2, steps=3)
    assert resumed == single[3:]
    ranks = [SyntheticScenes(4, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = [i for step in range(3) for stream in ranks for i in stream.positions_of_step(step)]
    assert sorted(seen) == list(range(24))  # every scene once, none twice


def test_validation_set_is_fixed():
    dataset = SyntheticSegmentation(5, seed=1)
    image, mask = dataset[3]
    assert np.array_equal(image, render_scene(3, seed=1).image) and mask.shape == (64, 64)
    with pytest.raises(IndexError):
        dataset[5]
