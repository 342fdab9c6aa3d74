"""Segmentation on disk: label PNGs (background 255 / 65535), overlays, clean names, no silent overwrite."""

import os
import stat

import numpy as np
import pytest
from layouts import random_image
from PIL import Image

from pacl_fast.head import BACKGROUND
from pacl_fast.results import (
    OVERLAY_BAND_PIXELS,
    Segmentation,
    image_name,
    output_files,
    palette,
)


def _result(shape=(13, 17), classes=3, seed=0, image=True, name=None) -> Segmentation:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, classes, shape).astype(np.int16)  # -1: background
    scores = rng.random(shape, dtype=np.float32)
    pixels = random_image(shape, seed) if image else None
    return Segmentation(labels, scores, tuple(f"c{i}" for i in range(classes)), "src", pixels, name=name)


def test_label_png_holds_classes_and_background_255(tmp_path):
    result = _result(classes=255)  # the most classes an 8-bit PNG can hold beside background
    result.labels[0, :3] = [-1, 0, 254]
    paths = result.save(tmp_path, "x")
    stored = Image.open(paths["labels"])
    assert stored.mode == "P"
    values = np.array(stored)
    np.testing.assert_array_equal(values, np.where(result.labels == -1, 255, result.labels))
    assert values[0, :3].tolist() == [255, 0, 254]
    colours = np.array(stored.getpalette()[: 3 * 255]).reshape(255, 3)
    np.testing.assert_array_equal(colours, palette(255))


def test_label_png_beyond_255_classes_is_16_bit_with_background_65535(tmp_path):
    result = _result(classes=300, seed=1)
    result.labels[0, :3] = [-1, 255, 299]
    stored = Image.open(result.save(tmp_path, "x")["labels"])
    assert stored.mode.startswith("I;16") or stored.mode == "I"
    values = np.array(stored).astype(np.int64)
    np.testing.assert_array_equal(values, np.where(result.labels == -1, 65535, result.labels.astype(np.int64)))
    assert values[0, :3].tolist() == [65535, 255, 299]


def test_overlay_blends_class_colours_and_leaves_background_as_the_image():
    result = _result(shape=(9, 11), classes=4, seed=2)
    alpha = 0.25
    overlay = np.array(result.overlay(alpha=alpha)).astype(np.int64)
    colours = palette(4).astype(np.float64)
    for y in range(9):
        for x in range(11):
            label, pixel = result.labels[y, x], result.image[y, x].astype(np.float64)
            expected = pixel if label == -1 else np.round(pixel * (1 - alpha) + colours[label] * alpha)
            np.testing.assert_array_equal(overlay[y, x], expected)
    with pytest.raises(ValueError, match="no image to overlay"):
        _result(image=False).overlay()
    with pytest.raises(ValueError, match=r"overlay image is \(4, 4\)"):
        result.overlay(np.zeros((4, 4, 3), np.uint8))


def test_overlay_in_bands_equals_one_pass(monkeypatch):
    """Large images are blended in bands of rows; the band edges must not show."""
    result = _result(shape=(37, 23), classes=5, seed=3)
    whole = np.array(result.overlay())
    monkeypatch.setattr("pacl_fast.results.OVERLAY_BAND_PIXELS", 23 * 4 + 5)  # 4-row bands, a short last one
    np.testing.assert_array_equal(np.array(result.overlay()), whole)
    assert OVERLAY_BAND_PIXELS >= 1 << 16


def test_save_names_files_cleanly_and_never_overwrites(tmp_path):
    """Issue 10 item 8: arrays were saved as 'ndarray of shape (...)_labels.png' and overwrote each other."""
    first, second = _result(seed=4), _result(seed=5)
    assert sorted(p.name for p in first.save(tmp_path).values()) == ["image0_labels.png", "image0_overlay.png"]
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'image0_labels.png'} already exists.*overwrite=True"):
        second.save(tmp_path)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "image0_labels.png")) == 255, first.labels == -1)
    assert second.save(tmp_path, index=1)["labels"].name == "image1_labels.png"
    second.save(tmp_path, overwrite=True)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "image0_labels.png")) == 255, second.labels == -1)
    labels_only = _result(seed=6, image=False, name="street")
    assert list(labels_only.save(tmp_path)) == ["labels"] and (tmp_path / "street_labels.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image0_labels.png",
        "image0_overlay.png",
        "image1_labels.png",
        "image1_overlay.png",
        "street_labels.png",
    ]  # fmt: skip  (no temporary files left)
    for stem in ("../escape", "/abs", "a//b", ""):
        with pytest.raises(ValueError, match="output name"):
            output_files(tmp_path, stem)
    with pytest.raises(ValueError, match="output name '../escape'"):
        first.save(tmp_path, "../escape")
    assert not (tmp_path.parent / "escape_labels.png").exists()


def test_image_names(tmp_path):
    path = tmp_path / "holiday.photo.jpg"
    Image.fromarray(random_image((8, 8), 0)).save(path)
    assert image_name(path) == image_name(str(path)) == "holiday.photo"
    assert image_name(Image.open(path)) == "holiday.photo"
    assert image_name(Image.fromarray(random_image((8, 8), 0))) is None  # made in memory: no file name
    assert image_name(np.zeros((4, 4, 3), np.uint8)) is None
    # A file name that is not UTF-8 gets the CLI's %XX form, so that save(), print and JSON take it.
    odd = tmp_path / os.fsdecode(b"caf\xe9 \xff.png")
    Image.fromarray(random_image((8, 8), 0)).save(odd)
    assert image_name(odd) == image_name(Image.open(odd)) == "caf%E9 %FF"
    assert image_name("/photos/...png") is None  # a stem no output file can carry


def test_class_shares_keep_a_class_named_background_apart_from_thresholded_pixels():
    labels = np.array([[0, 0, 1, BACKGROUND], [1, 1, BACKGROUND, BACKGROUND]], dtype=np.int16)  # [2, 4]
    named = Segmentation(labels=labels, scores=None, classes=("background", "cat"), source="x")
    assert named.class_shares() == {"background": 0.25, "cat": 0.375, "background (below threshold)": 0.375}
    plain = Segmentation(labels=labels, scores=None, classes=("dog", "cat"), source="x")
    assert plain.class_shares() == {"dog": 0.25, "cat": 0.375, "background": 0.375}


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_label_maps_and_overlays_honour_the_umask(tmp_path, mask, mode):
    """Issue 24 item 5: label and overlay PNGs were 0600 under umask 022 (atomic_write kept mkstemp's mode)."""
    old = os.umask(mask)
    try:
        paths = _result(seed=7).save(tmp_path / "sub", "x")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in paths.items()}
    assert modes == {"labels": mode, "overlay": mode}


def test_results_of_one_call_get_distinct_stems_and_save_side_by_side(tmp_path, tiny_config):
    """Issue 19 item 5: ``predict([array_a, array_b])`` named both results ``image0``, so the second ``save``
    into the same folder was refused. Inputs without a file name are named by their position in the call."""
    from helpers import make_segmenter

    segmenter = make_segmenter(tiny_config)
    photo = tmp_path / "photo.png"
    Image.fromarray(random_image((20, 30), 3)).save(photo)
    inputs = [random_image((20, 30), 1), str(photo), Image.fromarray(random_image((24, 24), 2))]
    results = segmenter.predict(inputs, ["a", "b"])
    assert [r.name for r in results] == ["image0", "photo", "image2"]
    for result in results:
        result.save(tmp_path / "out")
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    stems = ("image0", "photo", "image2")
    assert saved == sorted(f"{stem}_{kind}.png" for stem in stems for kind in ("labels", "overlay"))
    assert segmenter.predict(inputs[0], ["a", "b"]).name == "image0"  # one image: position 0
