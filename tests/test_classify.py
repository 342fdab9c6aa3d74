"""Zero-shot classification: PACL compatibility and plain CLIP side by side, ImageFolder top-1/top-5."""

import json

import numpy as np
import pytest
import torch
from conftest import make_segmenter
from layouts import random_image, save_image, write_tiny_clip
from PIL import Image

from kernels.reference import compatibility_reference
from pacl_fast.cli import main
from pacl_fast.data.classification import ImageFolder
from pacl_fast.data.names import ClassQueries
from pacl_fast.evaluate import evaluate_classification
from pacl_fast.images import ClipPreprocess
from pacl_fast.zeroshot import ZeroShotClassifier


@pytest.fixture(scope="module")
def classifier(tiny_config):
    return ZeroShotClassifier(make_segmenter(tiny_config, batch_size=4))


def test_preprocess_is_short_side_resize_then_centre_crop():
    mean, std = (0.5, 0.25, 0.5), (0.5, 0.5, 0.25)
    preprocess = ClipPreprocess(8, mean, std)
    tall = np.zeros((16, 8, 3), np.uint8)
    tall[:, :, 0] = np.arange(16, dtype=np.uint8)[:, None] * 10  # row index in red
    pixels = preprocess(tall)  # short side already 8: no resampling, rows 4..11 kept
    assert pixels.shape == (3, 8, 8)
    expected_red = (np.arange(4, 12) * 10 / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(pixels[0, :, 0].numpy(), expected_red, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pixels[1].numpy(), (0 - 0.25) / 0.5)
    wide = preprocess(Image.fromarray(random_image((20, 50), 0)))
    assert wide.shape == (3, 8, 8)


def test_scores_are_pacl_compatibility_and_clip_cosine(classifier):
    classes = ClassQueries((("cat", "kitten"), ("dog",), ("car", "automobile", "sedan")))
    texts = classifier.encode_classes(classes, "single")
    pixels = torch.stack([classifier.preprocess(random_image((70, 90), seed)) for seed in range(3)])
    scores = classifier.score(pixels, texts, classes)
    model = classifier.model
    patches = model.encode_image(pixels).flatten(1, 2)
    pacl = compatibility_reference(patches, texts, model.patch_logit_scale)  # [3, 6] per query
    clip = model.backbone.clip.encode_image(pixels, normalize=True) @ texts.T
    for method, per_query in (("pacl", pacl), ("clip", clip)):
        expected = torch.stack([per_query[:, :2].amax(-1), per_query[:, 2], per_query[:, 3:].amax(-1)], dim=-1)
        torch.testing.assert_close(scores[method], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scores["pacl"], scores["clip"])
    results = classifier.classify(
        [random_image((40, 40), 5), random_image((50, 30), 6)], ["cat", "dog", ["car", "sedan"]], top_k=2
    )
    assert len(results) == 2
    for result in results:
        for method in ("pacl", "clip"):
            names = [name for name, _ in result[method]]
            probabilities = [p for _, p in result[method]]
            assert len(names) == 2 and set(names) <= {"cat", "dog", "car"}
            assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


def _image_folder(root, per_class: int = 2, classes=("golden_retriever", "tabby_cat", "fire_truck")):
    for c, name in enumerate(classes):
        for i in range(per_class):
            save_image(random_image((40 + 4 * i, 48), seed=10 * c + i), root / name / f"{i}.png")
    return root


def test_image_folder_evaluation_counts_by_hand(tmp_path, classifier):
    folder = ImageFolder(_image_folder(tmp_path / "val", per_class=3))
    assert folder.names == (("fire truck",), ("golden retriever",), ("tabby cat",))
    (tmp_path / "val" / "tabby_cat" / "broken.png").write_bytes(b"nope")
    folder = ImageFolder(tmp_path / "val")
    report = evaluate_classification(classifier, folder, templates="single", progress=False)
    classes = ClassQueries(folder.names)
    texts = classifier.encode_classes(classes, "single")
    expected = {"pacl": 0, "clip": 0}
    for path, label in folder.samples:
        if path.name == "broken.png":
            continue
        scores = classifier.score(classifier.preprocess(path)[None], texts, classes)
        for method in expected:
            expected[method] += int(scores[method][0].argmax()) == label
    assert report.counts["count"].tolist() == [3, 3, 3]
    for method in ("pacl", "clip"):
        assert report.accuracy(method, 1) == pytest.approx(expected[method] / 9)
        assert report.accuracy(method, 5) == 1.0  # three classes: every label is in the top 5
    assert [f["id"] for f in report.failures] == ["tabby_cat/broken.png"]
    summary = report.to_dict()
    assert summary["num_images"] == 9 and set(summary["pacl"]) == {"top1", "top5", "mean_per_class_top1"}
    assert "| pacl |" in report.table() and "| clip |" in report.table()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    save_image(random_image((8, 8), 0), tmp_path / "flat" / "a.png")
    with pytest.raises(FileNotFoundError, match="has no class sub-folders"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class").mkdir()
    (tmp_path / "flat" / "cat").mkdir()
    save_image(random_image((8, 8), 0), tmp_path / "flat" / "cat" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"class folders without images \(empty_class\)"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class").rmdir()
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="has 2 classes but .* has 1 class folders"):
        ImageFolder(tmp_path / "flat", names)


def test_classify_command(tmp_path, tiny_config, capsys):
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    model = ["--clip", f"local-dir:{clip}", "--templates", "single", "--device", "cpu"]
    image = tmp_path / "photo.png"
    save_image(random_image((50, 60), 1), image)
    assert main(["classify", str(image), "--labels", "cat,dog,car", "--top-k", "2", *model]) == 0
    out = capsys.readouterr().out
    assert "photo.png" in out and "PACL" in out and "CLIP" in out
    assert len([line for line in out.splitlines() if "%" in line]) == 2
    _image_folder(tmp_path / "val")
    code = main(
        ["classify", "--image-folder", str(tmp_path / "val"), "--json", str(tmp_path / "r.json"), "--workers", "0"]
        + model
    )
    assert code == 0
    assert "| pacl |" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_images"] == 6 and result["clip"]["top5"] == 1.0
    assert not (tmp_path / "r.json.partial").exists()
    assert main(["classify", *model]) == 2
    assert "give image files, or --image-folder" in capsys.readouterr().err
