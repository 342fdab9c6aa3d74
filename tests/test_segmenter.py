import numpy as np
import pytest
import torch
from conftest import make_segmenter
from PIL import Image

import pacl_fast
from pacl_fast.images import SlidingWindow, fit_to_model, load_image, plan_resize
from pacl_fast.results import BatchError, ImageError, Segmentation
from pacl_fast.weights import save_pacl_weights

LABELS = ["circle", "square", "sky"]


@pytest.fixture(scope="module")
def segmenter(tiny_config):
    return make_segmenter(tiny_config)


def test_predict_every_input_kind(tmp_path, segmenter):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (33, 90, 3), dtype=np.uint8)).save(path)
    pil = Image.fromarray(array).convert("L")
    tensor = torch.rand(3, 64, 40)
    results = segmenter.predict([path, array, pil, tensor], LABELS, templates="single")
    assert [r.labels.shape for r in results] == [(33, 90), (50, 70), (50, 70), (64, 40)]
    for result in results:
        assert isinstance(result, Segmentation)
        assert result.labels.dtype == np.int16 and result.scores.dtype == np.float32
        assert result.classes == tuple(LABELS)
        assert result.labels.min() >= 0 and result.labels.max() < 3
        assert np.all((result.scores > 0) & (result.scores <= 1))
        assert sum(result.class_shares().values()) == pytest.approx(1.0)
    assert results[0].source == str(path)


def test_single_image_and_results_match_tensor_entry(segmenter):
    image = np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    result = segmenter.predict(image, LABELS, templates="single")
    assert isinstance(result, Segmentation)
    geometry = plan_resize((48, 80), segmenter.image_size, segmenter.patch_size)
    pixels = fit_to_model(load_image(image), geometry, segmenter.mean, segmenter.std)[None]
    classes = segmenter.encode_labels(LABELS, "single")
    labels, scores = segmenter.predict_torch(pixels, classes, (48, 80), grid_extent=geometry.grid_extent)
    assert np.array_equal(labels[0].numpy(), result.labels)
    np.testing.assert_allclose(scores[0].numpy(), result.scores, rtol=1e-6)
    labels_only, no_scores = segmenter.predict_torch(
        pixels, classes, (48, 80), grid_extent=geometry.grid_extent, with_scores=False
    )
    assert no_scores is None and torch.equal(labels_only, labels)


def test_bad_image_does_not_lose_the_others(tmp_path, segmenter):
    good = np.zeros((40, 40, 3), np.uint8)
    missing = tmp_path / "missing.jpg"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(BatchError, match="2 of 4 images failed") as caught:
        segmenter.predict([good, missing, broken, good], LABELS, templates="single")
    results = caught.value.results
    assert isinstance(results[0], Segmentation) and isinstance(results[3], Segmentation)
    assert isinstance(results[1], ImageError) and isinstance(results[1].error, FileNotFoundError)
    assert "broken.png" in str(results[2])
    returned = segmenter.predict([good, missing], LABELS, templates="single", errors="return")
    assert isinstance(returned[0], Segmentation) and isinstance(returned[1], ImageError)


@pytest.mark.parametrize("labels,message", [([], "empty"), (["a", "b", "a"], "duplicates")])
def test_bad_labels(segmenter, labels, message):
    with pytest.raises(ValueError, match=message):
        segmenter.predict(np.zeros((8, 8, 3), np.uint8), labels)


def test_bad_arguments(segmenter):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="errors must be"):
        segmenter.predict(image, LABELS, errors="ignore")
    with pytest.raises(ValueError, match="background_threshold"):
        segmenter.predict(image, LABELS, background_threshold=1.5)
    with pytest.raises(ValueError, match="images is empty"):
        segmenter.predict([], LABELS)


def test_background_threshold_marks_low_scores(segmenter):
    image = np.random.default_rng(2).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    plain = segmenter.predict(image, LABELS, templates="single")
    threshold = float(np.median(plain.scores))
    result = segmenter.predict(image, LABELS, templates="single", background_threshold=threshold)
    assert np.array_equal(result.labels == -1, plain.scores < threshold)
    assert "background" in result.class_shares()


def test_sliding_window_with_one_window_equals_plain(segmenter):
    image = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    plain = segmenter.predict(image, LABELS, templates="single")
    windowed = segmenter.predict(image, LABELS, templates="single", sliding_window=SlidingWindow(64, 64))
    assert np.array_equal(plain.labels, windowed.labels)
    tall = np.random.default_rng(4).integers(0, 255, (200, 70, 3), dtype=np.uint8)
    result = segmenter.predict(tall, LABELS, templates="single", sliding_window=SlidingWindow(64, 32, short_side=96))
    assert result.labels.shape == (200, 70)


def test_overlay_and_save(tmp_path, segmenter):
    image = np.random.default_rng(5).integers(0, 255, (30, 44, 3), dtype=np.uint8)
    result = segmenter.predict(image, LABELS, templates="single")
    overlay = result.overlay()
    assert overlay.size == (44, 30) and overlay.mode == "RGB"
    paths = result.save(tmp_path, stem="x")
    saved = Image.open(paths["labels"])
    assert saved.mode == "P" and np.array_equal(np.array(saved), result.labels.astype(np.uint8))
    assert Image.open(paths["overlay"]).size == (44, 30)
    bare = segmenter.predict(image, LABELS, templates="single", keep_images=False)
    with pytest.raises(ValueError, match="no image to overlay"):
        bare.overlay()


def test_trained_weights_roundtrip_through_segmenter(tmp_path, tiny_config, tiny_pacl):
    path = save_pacl_weights(tiny_pacl, tmp_path / "pacl.safetensors")
    segmenter = make_segmenter(tiny_config, pacl_weights=path)
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(segmenter.encoder.encode_image(pixels), tiny_pacl.encode_image(pixels))
    assert segmenter.metadata is not None and "trained" in repr(segmenter)


def test_bfloat16_encoder_agrees_with_float32(tiny_config):
    image = np.random.default_rng(6).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    fp32 = make_segmenter(tiny_config)
    bf16 = make_segmenter(tiny_config, dtype="bfloat16")
    pixels = torch.randn(1, 3, 64, 64)
    a, b = fp32.encoder.encode_image(pixels), bf16.encoder.encode_image(pixels).float()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert bf16.predict(image, LABELS, templates="single").labels.shape == (64, 64)


def test_help_documents_the_api():
    doc = pacl_fast.Segmenter.__doc__ + pacl_fast.Segmenter.predict.__doc__
    for word in ("clip_weights", "pacl_weights", "background_threshold", "sliding_window", "errors", "BatchError"):
        assert word in doc


def test_vit_b16_end_to_end_one_image():
    segmenter = make_segmenter("ViT-B-16")
    image = np.random.default_rng(7).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    result = segmenter.predict(image, ["cat", "dog"], templates="single")
    assert result.labels.shape == (224, 224) and set(np.unique(result.labels)) <= {0, 1}
