"""The papers' evaluation presets (pacl_fast.protocols) against their config files, and their post-processing."""

import json

import numpy as np
import pytest
import torch

from pacl_fast import protocols
from pacl_fast.data.segmentation import DATASETS, VOC_PROMPTS
from pacl_fast.protocols import (
    NAME_FILES,
    PRESETS,
    get_protocol,
    git_blob_id,
    protocol_labels,
    read_names_file,
)
from pacl_fast.refine import pamr

# Written from the repositories' files (commits in protocols.REPOSITORIES), not from the module:
# (logit scale, probability threshold, area threshold, short side, (crop, stride) or None, background).
# SCLIP: clip_segmentor.py:19-21 defaults logit_scale=40, prob_thd=0.0, area_thd=None, slide 224/112;
#   cfg_voc21.py:6-8 logit_scale=65, prob_thd=0.1, area_thd=0.1; cfg_context60.py:6-7 and
#   cfg_coco_object.py:6-7 logit_scale=50, prob_thd=0.1; Resize (2048, 336) everywhere except
#   cfg_coco_stuff164k.py:14 (2048, 448) and cfg_city_scapes.py:14 (2048, 560).
# NACLIP: naclip.py:20-22 defaults logit_scale=40, prob_thd=0.0, slide 224/112, pamr_steps=10,
#   pamr_stride=(8, 16); cfg_voc21.py:6-7 prob_thd=0.1, slide_crop=0; cfg_voc20.py:6 slide_crop=0;
#   cfg_context60.py:6 and cfg_coco_object.py:6 prob_thd=0.1; Resize (2048, 336) except
#   cfg_city_scapes.py:14 (2048, 560).
# ClearCLIP: clearclip_segmentor.py:23 defaults logit_scale=50, prob_thd=0.0, slide_stride=224,
#   slide_crop=448; cfg_voc21.py:6 prob_thd=0.5, cfg_context60.py:6 0.15, cfg_coco_object.py:6 0.4,
#   cfg_city_scapes.py:6 slide_crop=224; Resize (2048, 448) everywhere.
# ProxyCLIP (mc-lan/ProxyCLIP@e7b767f): proxyclip_segmentor.py:30-31 defaults prob_thd=0.0, logit_scale=40,
#   slide_stride=112, slide_crop=336; cfg_voc21.py:6 prob_thd=0.2, cfg_context60.py:6 0.15,
#   cfg_coco_object.py:6 0.25, cfg_city_scapes.py:6-7 slide_stride=112, slide_crop=224; Resize (2048, 336)
#   except cfg_ade20k.py:14 and cfg_city_scapes.py:16 (2048, 448).
# Background (class 0 of cls_voc21 / cls_context60 / cls_coco_object.txt): SCLIP and NACLIP ask VOC21
# and COCO-Object with 26 stuff names and Context60 with "background"; ClearCLIP says "background";
# ProxyCLIP asks VOC21 with 26 and COCO-Object with 17 stuff names, Context60 with "background".
EXPECTED = {
    ("sclip", "voc21"): (65, 0.1, 0.1, 336, (224, 112), "stuff"),
    ("sclip", "context60"): (50, 0.1, None, 336, (224, 112), "word"),
    ("sclip", "cocoobject"): (50, 0.1, None, 336, (224, 112), "stuff"),
    ("sclip", "voc20"): (40, 0.0, None, 336, (224, 112), None),
    ("sclip", "cityscapes"): (40, 0.0, None, 560, (224, 112), None),
    ("sclip", "context59"): (40, 0.0, None, 336, (224, 112), None),
    ("sclip", "ade20k"): (40, 0.0, None, 336, (224, 112), None),
    ("sclip", "cocostuff"): (40, 0.0, None, 448, (224, 112), None),
    ("naclip", "voc21"): (40, 0.1, None, 336, None, "stuff"),
    ("naclip", "context60"): (40, 0.1, None, 336, (224, 112), "word"),
    ("naclip", "cocoobject"): (40, 0.1, None, 336, (224, 112), "stuff"),
    ("naclip", "voc20"): (40, 0.0, None, 336, None, None),
    ("naclip", "cityscapes"): (40, 0.0, None, 560, (224, 112), None),
    ("naclip", "context59"): (40, 0.0, None, 336, (224, 112), None),
    ("naclip", "ade20k"): (40, 0.0, None, 336, (224, 112), None),
    ("naclip", "cocostuff"): (40, 0.0, None, 336, (224, 112), None),
    ("clearclip", "voc21"): (50, 0.5, None, 448, (448, 224), "word"),
    ("clearclip", "context60"): (50, 0.15, None, 448, (448, 224), "word"),
    ("clearclip", "cocoobject"): (50, 0.4, None, 448, (448, 224), "word"),
    ("clearclip", "voc20"): (50, 0.0, None, 448, (448, 224), None),
    ("clearclip", "cityscapes"): (50, 0.0, None, 448, (224, 224), None),
    ("clearclip", "context59"): (50, 0.0, None, 448, (448, 224), None),
    ("clearclip", "ade20k"): (50, 0.0, None, 448, (448, 224), None),
    ("clearclip", "cocostuff"): (50, 0.0, None, 448, (448, 224), None),
    ("proxyclip", "voc21"): (40, 0.2, None, 336, (336, 112), "stuff"),
    ("proxyclip", "context60"): (40, 0.15, None, 336, (336, 112), "word"),
    ("proxyclip", "cocoobject"): (40, 0.25, None, 336, (336, 112), "stuff"),
    ("proxyclip", "voc20"): (40, 0.0, None, 336, (336, 112), None),
    ("proxyclip", "cityscapes"): (40, 0.0, None, 448, (224, 112), None),
    ("proxyclip", "context59"): (40, 0.0, None, 336, (336, 112), None),
    ("proxyclip", "ade20k"): (40, 0.0, None, 448, (336, 112), None),
    ("proxyclip", "cocostuff"): (40, 0.0, None, 336, (336, 112), None),
}


def test_every_preset_holds_what_its_repository_config_sets():
    assert set(PRESETS) == set(EXPECTED)
    for (name, dataset), (scale, threshold, area, short, slide, background) in EXPECTED.items():
        preset = get_protocol(name, dataset)
        assert (preset.name, preset.dataset) == (name, dataset)
        got = (preset.logit_scale, preset.prob_threshold, preset.area_threshold, preset.short_side)
        assert got == (scale, threshold, area, short), (name, dataset)
        assert (None if preset.whole_image else (preset.slide_crop, preset.slide_stride)) == slide, (name, dataset)
        assert preset.slide_stride is None if slide is None else preset.slide_stride is not None
        assert preset.background == background, (name, dataset)
        assert preset.background_index == (0 if background else None)
        assert preset.pamr == ((10, (8, 16)) if name == "naclip" else None)
        assert preset.crop_remainder == ("pad" if name in ("clearclip", "proxyclip") else "drop")
        assert preset.templates == "imagenet" and preset.max_long_side == 2048 and preset.precision == "fp16"
        assert len(preset.class_names) == len(DATASETS[dataset].classes), (name, dataset)
        assert any("configs/cfg_" in s for s in preset.source) and any(".txt" in s for s in preset.source)
        json.dumps(preset.to_dict())  # reports can hold it


def test_class_name_files_are_the_repositories_files_parsed_their_way():
    for relative, blob in NAME_FILES.items():
        assert git_blob_id((protocols.NAMES_DIR / relative).read_bytes()) == blob, relative
    sclip_voc = read_names_file("sclip/cls_voc21.txt")
    assert sclip_voc == VOC_PROMPTS  # the dataset's default prompts are SCLIP's list
    assert get_protocol("naclip", "voc21").class_names == sclip_voc
    assert get_protocol("clearclip", "voc21").class_names[0] == ("background",)
    assert get_protocol("clearclip", "voc21").class_names[15] == ("person",)
    assert all(len(n) == 1 for (p, _), e in PRESETS.items() if p == "clearclip" for n in e.class_names)
    context60 = get_protocol("sclip", "context60").class_names
    assert context60[0] == ("background",) and context60[-1] == ("wood ",)  # the file's last line, unstripped
    city = get_protocol("sclip", "cityscapes").class_names
    assert city[6] == ("trafficlight",) and city[7] == ("trafficsign",)  # as written in cls_city_scapes.txt
    coco = get_protocol("sclip", "cocoobject")
    assert len(coco.class_names[0]) == 26 and coco.class_names[1][-1] == "body"
    assert "bed" in coco.class_names[0] and coco.class_names[60] == ("bed",)  # the file lists "bed" twice
    assert len(coco.queries) == 26 + 8 + 79 and coco.query_class.tolist().count(0) == 26
    # ProxyCLIP: its own VOC21 and COCO-Object files, split on "; "; the others are SCLIP's and ClearCLIP's blobs.
    proxy_voc = get_protocol("proxyclip", "voc21").class_names
    assert len(proxy_voc[0]) == 26 and proxy_voc[0][:2] == ("sky", "wall") and proxy_voc[15] == ("person",)
    assert proxy_voc[1:] == get_protocol("proxyclip", "voc20").class_names  # VOC20 + the stuff background
    proxy_coco = get_protocol("proxyclip", "cocoobject").class_names
    assert len(proxy_coco[0]) == 17 and proxy_coco[0][-1] == "rail" and proxy_coco[1] == ("person",)
    assert all(len(n) == 1 for n in proxy_coco[1:]) and len(proxy_coco) == 81
    assert get_protocol("proxyclip", "voc20").names_file == "clearclip/cls_voc20.txt"
    assert get_protocol("proxyclip", "context60").class_names == context60
    for dataset in ("voc20", "context60", "context59", "cocostuff", "ade20k", "cityscapes"):  # shared files: no
        data = (protocols.NAMES_DIR / get_protocol("proxyclip", dataset).names_file).read_bytes()  # separator
        assert b"; " not in data and b"," not in data, dataset


def test_a_changed_name_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "sclip").mkdir()
    original = (protocols.NAMES_DIR / "sclip" / "cls_voc20.txt").read_bytes()
    (tmp_path / "sclip" / "cls_voc20.txt").write_bytes(original.replace(b"ship", b"boat"))
    monkeypatch.setattr(protocols, "NAMES_DIR", tmp_path)
    protocols.read_names_file.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"cls_voc20\.txt was changed"):
            read_names_file("sclip/cls_voc20.txt")
        with pytest.raises(FileNotFoundError, match="missing from the installed package"):
            read_names_file("sclip/cls_voc21.txt")
        with pytest.raises(ValueError, match="unknown class-name file 'x.txt'"):
            read_names_file("x.txt")
    finally:
        protocols.read_names_file.cache_clear()


def test_unknown_protocol_or_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown protocol 'maskclip'; choose one of sclip, naclip, clearclip"):
        get_protocol("maskclip", "voc21")
    with pytest.raises(
        ValueError, match=r"protocol naclip does not configure dataset 'synthetic'; it configures: voc21"
    ):
        get_protocol("naclip", "synthetic")


def labels_reference(logits, query_class, scale, threshold, area):
    """Pixel by pixel in float64: softmax over queries, best synonym per class, area rule, argmax, threshold."""
    q, height, width = logits.shape
    num_classes = max(query_class) + 1
    probs = np.zeros((num_classes, height, width))
    for y in range(height):
        for x in range(width):
            z = logits[:, y, x] * scale
            e = np.exp(z - z.max())
            p = e / e.sum()
            for c in range(num_classes):
                probs[c, y, x] = max(p[i] for i in range(q) if query_class[i] == c)
    if area is not None:
        winners = probs.argmax(axis=0)
        counts = [int((winners == c).sum()) for c in range(num_classes)]
        foreground = sum(counts[1:])
        for c in range(1, num_classes):
            if not counts[c] > area * foreground:
                probs[c] = 0.0
    labels = probs.argmax(axis=0)
    labels[probs.max(axis=0) < threshold] = 0
    return labels


@pytest.mark.parametrize(("name", "dataset"), [("sclip", "voc21"), ("sclip", "cocoobject"), ("clearclip", "context60")])
def test_protocol_labels_equal_the_pixel_loop(name, dataset):
    preset = get_protocol(name, dataset)
    query_class = preset.query_class
    generator = torch.Generator().manual_seed(len(query_class))
    logits = 0.2 + 0.03 * torch.randn(len(query_class), 11, 7, generator=generator, dtype=torch.float64)
    boost = torch.randint(0, len(query_class), (3,), generator=generator)
    logits[boost[0]] += 0.05  # one broad winner, one class on a few pixels, one on a corner
    logits[boost[1], :3] += 0.08
    logits[boost[2], :1, :2] += 0.1
    logits[:, 5:7, 3:5] = 0.2  # exact ties: every query equal there
    expected = labels_reference(logits.numpy(), query_class.tolist(), preset.logit_scale, preset.prob_threshold,
                                preset.area_threshold)  # fmt: skip
    labels = preset.postprocess(logits)
    assert labels.dtype == torch.int64 and labels.shape == (11, 7)
    np.testing.assert_array_equal(labels.numpy(), expected)
    # a batch gives each image its own area counts
    batch = torch.stack([logits, logits.flip(-1)])
    flipped = labels_reference(logits.flip(-1).numpy(), query_class.tolist(), preset.logit_scale,
                               preset.prob_threshold, preset.area_threshold)  # fmt: skip
    np.testing.assert_array_equal(preset.postprocess(batch).numpy(), np.stack([expected, flipped]))


def test_synonyms_take_the_max_thresholds_and_small_areas_fall_back():
    # probabilities p from logits log(p) / scale; 3 classes: class 0 (background), class 1 with two synonyms
    scale = 10.0
    query_class = [0, 1, 1, 2]

    def logits_for(*columns):  # each column: the 4 query probabilities of one pixel
        return torch.tensor(np.log(np.array(columns, dtype=np.float64).T) / scale).unsqueeze(-2)  # [4, 1, W]

    # class 1's synonyms have 0.3 each (sum 0.6) but class 2's 0.35 wins: best synonym, not the sum
    logits = logits_for([0.05, 0.3, 0.3, 0.35])
    assert protocol_labels(logits, query_class, logit_scale=scale).tolist() == [[2]]
    # under the probability threshold -> class 0
    assert protocol_labels(logits, query_class, logit_scale=scale, prob_threshold=0.36).tolist() == [[0]]
    # area: 1 background pixel, 1 pixel of class 1, 10 of class 2: class 1 has 1 of 11 foreground pixels,
    # not more than 0.1 * 11, so it is zeroed and its pixel goes to its next best class (2 here)
    pixels = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.05, 0.25]] + [[0.1, 0.1, 0.1, 0.7]] * 10
    logits = logits_for(*pixels)
    labels = protocol_labels(logits, query_class, logit_scale=scale, area_threshold=0.1)
    assert labels.tolist() == [[0, 2] + [2] * 10]
    assert protocol_labels(logits, query_class, logit_scale=scale).tolist() == [[0, 1] + [2] * 10]
    # the rule is "more than": 1 of 10 foreground pixels is not more than 0.1 * 10; 2 of 19 is more than 1.9,
    # and the background's pixels do not count (2 of 21 pixels would not be more than 2.1)
    boundary = logits_for(*pixels[:11])
    labels = protocol_labels(boundary, query_class, logit_scale=scale, area_threshold=0.1)
    assert labels.tolist() == [[0, 2] + [2] * 9]
    wider = logits_for(*(pixels[:1] * 2 + pixels[1:2] * 2 + pixels[2:3] * 17))
    labels = protocol_labels(wider, query_class, logit_scale=scale, area_threshold=0.1)
    assert labels.tolist() == [[0, 0, 1, 1] + [2] * 17]
    # once zeroed, its pixel may fall under the threshold too (0.25 < 0.3)
    labels = protocol_labels(logits, query_class, logit_scale=scale, area_threshold=0.1, prob_threshold=0.3)
    assert labels.tolist() == [[0, 0] + [2] * 10]
    with pytest.raises(ValueError, match="query_class must list the class of each of the 4 queries"):
        protocol_labels(logits, [0, 1, 2], logit_scale=scale)
    with pytest.raises(ValueError, match="each with at least one query"):
        protocol_labels(logits, [0, 2, 2, 3], logit_scale=scale)


def test_naclip_runs_pamr_on_the_cosines_before_the_scale():
    preset = get_protocol("naclip", "context60")
    generator = torch.Generator().manual_seed(7)
    logits = 0.2 + 0.05 * torch.randn(60, 9, 12, generator=generator)
    image = torch.rand(3, 9, 12, generator=generator)
    refined = pamr(image[None], logits[None], 10, (8, 16))[0]
    expected = protocol_labels(refined, preset.query_class, logit_scale=40.0, prob_threshold=0.1)
    assert torch.equal(preset.postprocess(logits, image), expected)
    assert not torch.equal(expected, protocol_labels(logits, preset.query_class, logit_scale=40.0, prob_threshold=0.1))
    with pytest.raises(ValueError, match="protocol naclip on context60 runs PAMR: pass the image"):
        preset.postprocess(logits)


def test_every_name_file_lists_the_dataset_classes_in_label_order():
    # first names are the mmseg class names (some written without spaces), stuff (from "sky") for background, and:
    renames = {"boat": "ship", "diningtable": "table", "tvmonitor": "televisionmonitor"}
    for (name, dataset), preset in PRESETS.items():
        for index, (synonyms, cls) in enumerate(zip(preset.class_names, DATASETS[dataset].classes)):
            first, expected = synonyms[0].replace(" ", ""), cls.replace(" ", "")
            if first != expected:
                assert (index, first) in ((0, "sky"), (index, renames.get(expected))), (name, dataset, index, synonyms)


def test_exact_ties_and_the_threshold_boundary():
    # the threshold is "under": a best probability of exactly 0.5 stays (third query underflows to 0)
    logits = torch.tensor([[-1e4], [0.3], [0.3]], dtype=torch.float64).unsqueeze(-1)  # [3, 1, 1]
    assert protocol_labels(logits, [0, 1, 2], logit_scale=50.0, prob_threshold=0.5).tolist() == [[1]]
    assert protocol_labels(logits, [0, 1, 2], logit_scale=50.0, prob_threshold=0.51).tolist() == [[0]]
    # equal scores: the lowest class wins, as torch.argmax in the repositories
    voc20 = get_protocol("sclip", "voc20")
    assert voc20.postprocess(torch.full((len(voc20.queries), 2, 3), 0.2)).tolist() == [[0, 0, 0], [0, 0, 0]]
    # SCLIP's COCO-Object asks "bed" in the background and as class 60: where bed wins, the background does
    coco = get_protocol("sclip", "cocoobject")
    logits = torch.full((len(coco.queries), 1, 2), 0.2)
    for query in np.flatnonzero(np.array(coco.queries) == "bed"):
        logits[query] = 0.3
    logits[coco.queries.index("cat"), 0, 1] = 0.35
    cat = coco.class_names.index(("cat",))
    assert coco.postprocess(logits).tolist() == [[0, cat]]


# --- the protocols' resize and NACLIP's PAMR guide (issue 19 items 2 and 3) --------------------------------


def naclip_network_input(image: np.ndarray, short: int) -> torch.Tensor:
    """NACLIP's test pipeline for one image, written out: mmcv ``Resize(scale=(2048, short), keep_ratio=True)``
    (``rescale_size`` and ``cv2.resize`` INTER_LINEAR on uint8), then ``SegDataPreProcessor`` with its own
    constants (naclip.py l. 24: mean 122.771, 116.746, 104.094, std 68.501, 66.632, 70.323, in 0..255)."""
    cv2 = pytest.importorskip("cv2", reason="needs OpenCV (opencv-python-headless, a dependency of pacl-fast)")
    h, w = image.shape[:2]
    scale = min(2048 / max(h, w), short / min(h, w))
    resized = cv2.resize(image, (int(w * scale + 0.5), int(h * scale + 0.5)), interpolation=cv2.INTER_LINEAR)
    mean = torch.tensor([122.771, 116.746, 104.094])[:, None, None]
    std = torch.tensor([68.501, 66.632, 70.323])[:, None, None]
    return ((torch.from_numpy(resized).permute(2, 0, 1).float() - mean) / std)[None]  # [1, 3, h', w']


@pytest.mark.parametrize("size", [(41, 67), (500, 375), (333, 500)])
def test_preprocessor_and_pamr_guide_are_naclips(size):
    """The protocol's model input is NACLIP's network input (up to the 3-decimal rounding of its mean/std), and
    PAMR's guide is that input resized back to the original size (naclip.py l. 130), not the original image."""
    from pacl_fast.backbone import OPENAI_MEAN, OPENAI_STD

    preset = get_protocol("naclip", "voc21")
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    network_input = naclip_network_input(image, 336)
    prepared = preset.preprocessor(16, OPENAI_MEAN, OPENAI_STD)(image)
    height, width = prepared.geometry.resized_size
    assert (height, width) == tuple(network_input.shape[-2:]) and min(height, width) == 336
    torch.testing.assert_close(prepared.pixels[None, :, :height, :width], network_input, rtol=0, atol=2e-4)
    guide = preset.pamr_guide(prepared.pixels, prepared.geometry)
    expected = torch.nn.functional.interpolate(network_input, size=size, mode="bilinear", align_corners=False)[0]
    assert guide.shape == (3, *size)
    torch.testing.assert_close(guide, expected, rtol=0, atol=2e-4)
    # the guide matters: PAMR with the original image refines otherwise
    logits = 0.2 + 0.05 * torch.randn(5, *size, generator=torch.Generator().manual_seed(1))
    original = torch.from_numpy(image).permute(2, 0, 1).float()
    with_guide = pamr(guide[None], logits[None], 10, (8, 16))
    assert (with_guide - pamr(original[None], logits[None], 10, (8, 16))).abs().max() > 1e-3
    torch.testing.assert_close(with_guide, pamr(expected[None], logits[None], 10, (8, 16)), rtol=0, atol=1e-5)
