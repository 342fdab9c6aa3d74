"""Benchmark readers: every layout written by the tests, read back as class indices."""

import numpy as np
import pytest
import torch
from layouts import (
    save_grey_png,
    save_image,
    write_ade,
    write_cityscapes,
    write_coco_stuff,
    write_context,
    write_voc,
)
from PIL import Image

from pacl_fast.data.names import ClassQueries, parse_class_names, read_class_names
from pacl_fast.data.segmentation import DATASETS, open_dataset


def test_registry_lists_every_benchmark_with_its_class_count():
    counts = {name: len(cls.classes) for name, cls in DATASETS.items()}
    assert counts == {
        "voc21": 21,
        "voc20": 20,
        "context60": 60,
        "context59": 59,
        "cocostuff": 171,
        "ade20k": 150,
        "cityscapes": 19,
        "cocoobject": 81,
        "synthetic": 6,
    }
    for cls in DATASETS.values():
        assert len(set(cls.classes)) == len(cls.classes)
        names = ClassQueries(cls.prompt_names(cls))  # synonyms unique, one line per class
        assert names.num_classes == len(cls.classes)
    assert DATASETS["voc21"].background_index == 0 and DATASETS["voc20"].background_index is None
    assert DATASETS["ade20k"].reduce_zero_label and not DATASETS["cocostuff"].reduce_zero_label


def test_voc21_and_voc20_read_the_same_files_with_and_without_background(tmp_path):
    raw = np.array([[0, 0, 15, 15], [255, 1, 20, 0], [3, 3, 255, 255]], np.uint8)
    write_voc(tmp_path, {"2007_000032": raw, "2007_000039": np.zeros((3, 4), np.uint8)})
    voc21 = open_dataset("voc21", tmp_path)  # found below VOCdevkit/VOC2012
    image, mask = voc21[0]
    assert voc21.sample_id(0) == "2007_000032" and len(voc21) == 2
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, raw.astype(np.int64))
    voc20 = open_dataset("voc20", tmp_path / "VOCdevkit" / "VOC2012")
    expected = np.array([[255, 255, 14, 14], [255, 0, 19, 255], [2, 2, 255, 255]])
    np.testing.assert_array_equal(voc20[0][1], expected)
    assert voc20.classes[14] == "person" and voc21.classes[15] == "person"
    assert (voc20[1][1] == 255).all()


def test_context60_and_context59(tmp_path):
    raw = np.array([[0, 1, 59], [37, 0, 2]], np.uint8)
    write_context(tmp_path, {"2008_000002": raw})
    np.testing.assert_array_equal(open_dataset("context60", tmp_path)[0][1], raw)
    np.testing.assert_array_equal(open_dataset("context59", tmp_path)[0][1], [[255, 0, 58], [36, 255, 1]])
    assert DATASETS["context59"].classes[36] == "person"


def test_coco_stuff_converted_and_raw_maps(tmp_path):
    converted = np.array([[0, 170, 255], [79, 80, 12]], np.uint8)
    write_coco_stuff(tmp_path / "a", {"000000000139": converted}, converted=True)
    np.testing.assert_array_equal(open_dataset("cocostuff", tmp_path / "a")[0][1], converted)
    # Raw stuffthingmaps hold COCO id - 1: raw 10 (fire hydrant, id 11) is class 10; raw 12 (stop sign,
    # id 13) is class 11 because id 12 was retired; raw 91 (banner, id 92) is 80; raw 181 (wood) is 170.
    raw = np.array([[0, 10, 12], [181, 91, 255]], np.uint8)
    write_coco_stuff(tmp_path / "b", {"000000000285": raw}, converted=False)
    coco = open_dataset("cocostuff", tmp_path / "b" / "coco_stuff164k")
    np.testing.assert_array_equal(coco[0][1], [[0, 10, 11], [170, 80, 255]])
    assert coco.classes[11] == "stop sign" and coco.classes[80] == "banner" and coco.classes[170] == "wood"


def test_ade20k_reduces_zero_label(tmp_path):
    raw = np.array([[0, 1, 150], [13, 0, 255]], np.uint8)
    write_ade(tmp_path, {"ADE_val_00000001": raw})
    ade = open_dataset("ade20k", tmp_path)
    np.testing.assert_array_equal(ade[0][1], [[255, 0, 149], [12, 255, 255]])
    assert ade.classes[0] == "wall" and ade.classes[149] == "flag" and ade.split == "val"


def test_cityscapes_train_ids_and_label_ids(tmp_path):
    train = np.array([[0, 18, 255], [11, 13, 2]], np.uint8)
    write_cityscapes(tmp_path / "a", {"frankfurt_000000_000294": train}, train_ids=True)
    np.testing.assert_array_equal(open_dataset("cityscapes", tmp_path / "a")[0][1], train)
    label_ids = np.array([[7, 33, 0], [24, 26, 11], [1, 9, 31]], np.uint8)  # road, bicycle, unlabeled / ...
    write_cityscapes(tmp_path / "b", {"lindau_000000_000019": label_ids}, train_ids=False)
    city = open_dataset("cityscapes", tmp_path / "b")
    np.testing.assert_array_equal(city[0][1], [[0, 18, 255], [11, 13, 2], [255, 255, 16]])
    assert city.sample_id(0) == "lindau_000000_000019"


def test_missing_or_malformed_folders_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*JPEGImages"):
        open_dataset("voc21", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"is not a ade20k folder.*ADEChallengeData2016"):
        open_dataset("ade20k", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'voc'; choose one of"):
        open_dataset("voc", tmp_path)
    with pytest.raises(ValueError, match="dataset cityscapes reads files: give its folder"):
        open_dataset("cityscapes", None)
    voc = write_voc(tmp_path, {"a": np.zeros((4, 4), np.uint8), "b": np.zeros((4, 4), np.uint8)})
    with pytest.raises(FileNotFoundError, match=r"split file .*train\.txt not found"):
        open_dataset("voc21", tmp_path, "train")
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 files of split 'val' are missing.*SegmentationClass/b\.png"):
        open_dataset("voc21", tmp_path)


def test_bad_masks_are_errors_naming_the_file(tmp_path):
    voc = write_voc(tmp_path, {"a": np.zeros((4, 4), np.uint8), "b": np.zeros((4, 4), np.uint8)})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(voc / "SegmentationClass" / "a.png")  # a colour rendering
    save_grey_png(np.full((4, 4), 21, np.uint8), voc / "SegmentationClass" / "b.png")  # no class 21 in VOC
    dataset = open_dataset("voc21", tmp_path)
    with pytest.raises(ValueError, match=r"a\.png is a RGB image; expected a single-channel label map"):
        dataset[0]
    with pytest.raises(ValueError, match=r"b\.png has label values \[21\] outside 0\.\.20"):
        dataset[1]
    save_image(np.zeros((5, 4, 3), np.uint8), voc / "JPEGImages" / "b.jpg")
    save_grey_png(np.zeros((4, 4), np.uint8), voc / "SegmentationClass" / "b.png")
    with pytest.raises(ValueError, match=r"mask .*b\.png is 4x4 but image .*b\.jpg is 4x5"):
        dataset[1]


def test_class_names_files_with_synonyms(tmp_path):
    path = tmp_path / "cls_voc.txt"
    path.write_text("sky, wall, tree\naeroplane\n\nperson, person in shirt\n")
    names = read_class_names(path)
    assert names == (("sky", "wall", "tree"), ("aeroplane",), ("person", "person in shirt"))
    queries = ClassQueries(names)
    assert queries.queries == ("sky", "wall", "tree", "aeroplane", "person", "person in shirt")
    labels = np.array([[0, 2, 3], [5, -1, 4]])
    np.testing.assert_array_equal(queries.labels_to_classes(labels, none_class=0), [[0, 0, 1], [2, 0, 2]])
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.4, 0.5], [0.0, 0.0, 0.0, 0.7, 0.8, 0.1]])
    torch.testing.assert_close(queries.scores_to_classes(scores), torch.tensor([[0.9, 0.3, 0.5], [0.0, 0.7, 0.8]]))
    with pytest.raises(ValueError, match="line 2: empty name"):
        parse_class_names(["cat", "dog,, puppy"], "x.txt")
    with pytest.raises(ValueError, match="'cat' is given for class 0 and class 1"):
        ClassQueries((("cat",), ("dog", "cat")))
    with pytest.raises(FileNotFoundError, match="class-names file not found"):
        read_class_names(tmp_path / "nope.txt")


def test_synthetic_world_is_a_dataset_made_not_read():
    from pacl_fast.data.synthetic import SYNTHETIC_TEMPLATES, render_scene

    world = open_dataset("synthetic", None)
    assert len(world) == 500 and world.split == "val" and world.templates == SYNTHETIC_TEMPLATES
    image, mask = world[7]
    scene = render_scene(7, seed=1)  # the validation seed
    np.testing.assert_array_equal(image, scene.image)
    np.testing.assert_array_equal(mask, scene.mask.astype(np.int64))
    assert mask.dtype == np.int64 and set(np.unique(mask)) <= {*range(6), 255}
    other = open_dataset("synthetic", None, "seed5")
    np.testing.assert_array_equal(other[0][0], render_scene(0, seed=5).image)
    assert other.sample_id(0) == "seed5/0"
    with pytest.raises(ValueError, match="split must be 'val' or 'seedN'"):
        open_dataset("synthetic", None, "train")


def test_coco_object_converted_maps(tmp_path):
    from layouts import write_coco_object

    # cvt_coco_object.py output: 0 background, 1..80 the things (1 person, 80 toothbrush)
    converted = np.array([[0, 1, 80], [37, 255, 12]], np.uint8)
    write_coco_object(tmp_path, {"000000000139": converted, "000000000285": np.zeros((2, 3), np.uint8)}, converted=True)
    coco = open_dataset("cocoobject", tmp_path)  # found below coco_object/
    image, mask = coco[0]
    assert len(coco) == 2 and coco.sample_id(0) == "000000000139" and coco.split == "val"
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8 and mask.dtype == np.int64
    np.testing.assert_array_equal(mask, converted.astype(np.int64))
    np.testing.assert_array_equal(coco[1][1], np.zeros((2, 3)))
    assert coco.num_classes == 81 and coco.background_index == 0 and coco.ignore_index == 255
    assert coco.classes[0] == "background" and coco.classes[1] == "person" and coco.classes[37] == "skateboard"
    assert coco.classes[12] == "stop sign" and coco.classes[80] == "toothbrush"
    assert not coco.reduce_zero_label
    from layouts import save_grey_png as save

    save(
        np.full((2, 3), 81, np.uint8),
        tmp_path / "coco_object" / "annotations" / "val2017" / "000000000285_instanceTrainIds.png",
    )
    with pytest.raises(ValueError, match=r"000000000285_instanceTrainIds\.png has label values \[81\] outside 0\.\.80"):
        coco[1]


def test_coco_object_from_raw_stuffthingmaps(tmp_path):
    from layouts import write_coco_object

    # Raw values are COCO id - 1. Things become 1..80 in COCO order: raw 0 (person, id 1) -> 1; raw 10
    # (fire hydrant, id 11) -> 11; raw 12 (stop sign, id 13) -> 12 since id 12 was retired; raw 89
    # (toothbrush, id 90) -> 80. Stuff (raw 91 banner .. 181 wood) and unlabeled 255 become background 0,
    # as cvt_coco_object.py maps them. Retired ids (raw 11, 90) name nothing and are ignored.
    raw = np.array([[0, 10, 12], [89, 91, 255], [181, 11, 90]], np.uint8)
    write_coco_object(tmp_path, {"000000000632": raw}, converted=False, folder="coco_stuff164k")
    coco = open_dataset("cocoobject", tmp_path / "coco_stuff164k")
    np.testing.assert_array_equal(coco[0][1], [[1, 11, 12], [80, 0, 0], [0, 255, 255]])
    assert coco.classes[11] == "fire hydrant"
    # the converter writes its maps next to the raw ones (and mmseg's COCO-Stuff _labelTrainIds): its maps win
    converted = np.array([[5, 5, 5], [0, 0, 0], [9, 9, 9]], np.uint8)
    write_coco_object(tmp_path, {"000000000632": converted}, converted=True, folder="coco_stuff164k")
    from layouts import save_grey_png as save

    save(
        np.full((3, 3), 170, np.uint8),
        tmp_path / "coco_stuff164k" / "annotations" / "val2017" / "000000000632_labelTrainIds.png",
    )
    coco = open_dataset("cocoobject", tmp_path)  # found below coco_stuff164k/
    assert len(coco) == 1
    np.testing.assert_array_equal(coco[0][1], converted)


def test_coco_object_missing_folders_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a cocoobject folder.*ID_instanceTrainIds\.png"):
        open_dataset("cocoobject", tmp_path)
    (tmp_path / "coco_object" / "images" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"annotations/val2017 is missing; expected coco_object/"):
        open_dataset("cocoobject", tmp_path)
    from layouts import save_image

    save_image(np.zeros((2, 2, 3), np.uint8), tmp_path / "coco_object" / "images" / "val2017" / "a.jpg")
    (tmp_path / "coco_object" / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"(?s)1 files of split 'val' are missing.*val2017/a\.png"):
        open_dataset("cocoobject", tmp_path)


def test_coco_object_is_registered_with_prompts_the_engine_accepts():
    coco = DATASETS["cocoobject"]
    assert len(coco.classes) == 81 and len(set(coco.classes)) == 81
    names = ClassQueries(coco.prompt_names(coco))  # synonyms unique, one line per class
    assert names.num_classes == 81
    assert names.names[0][:3] == ("sky", "wall", "tree") and "bed" not in names.names[0]
    assert names.names[60] == ("bed",) and names.names[1][-1] == "body"
