"""Segmentation metrics and the evaluation loop: hand-computed numbers, ignore index, resume, ranks."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_segmenter, opencv
from layouts import (
    save_image,
    write_ade,
    write_cityscapes,
    write_coco_stuff,
    write_context,
    write_tiny_clip,
    write_tiny_pacl,
    write_voc,
)
from PIL import Image

from pacl_fast.cli import main
from pacl_fast.data.segmentation import open_dataset
from pacl_fast.distributed import DistInfo
from pacl_fast.evaluate import evaluate_segmentation
from pacl_fast.images import SlidingWindow
from pacl_fast.metrics import SegmentationMetrics, confusion_matrix
from pacl_fast.runs import clear_state

ROOT = Path(__file__).resolve().parents[1]


def test_confusion_and_metrics_by_hand():
    truth = np.array([[0, 0, 1], [1, 2, 255]])
    prediction = np.array([[0, 1, 1], [1, 0, 2]])
    confusion = confusion_matrix(prediction, truth, num_classes=4)
    # rows truth, columns prediction; the last pixel is ignored whatever is predicted there
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    metrics = SegmentationMetrics(("a", "b", "c", "d"), confusion.numpy())
    # a: TP 1, truth 2, predicted 2 -> 1/3; b: TP 2, truth 2, predicted 3 -> 2/3; c: 0/1; d: absent -> NaN
    np.testing.assert_allclose(metrics.iou[:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(metrics.iou[3]) and math.isnan(metrics.accuracy[3])
    assert metrics.miou == pytest.approx(1 / 3)
    assert metrics.macc == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics.aacc == pytest.approx(3 / 5)
    report = metrics.to_dict()
    assert report["per_class"][3] == {"class": "d", "IoU": None, "Acc": None, "pixels": 0}
    assert "mIoU 33.33  mAcc 50.00  aAcc 60.00" in metrics.table()


def test_a_class_predicted_but_absent_counts_as_zero():
    confusion = confusion_matrix(np.array([1, 1, 0]), np.array([0, 0, 0]), num_classes=2)
    metrics = SegmentationMetrics(("a", "b"), confusion.numpy())
    np.testing.assert_allclose(metrics.iou, [1 / 3, 0.0])  # b: truth 0, predicted 2 -> union 2, IoU 0
    assert metrics.miou == pytest.approx(1 / 6)


def test_ignore_index_is_honoured_and_bad_values_refused():
    truth = np.full((3, 3), 255)
    truth[1, 1] = 2
    prediction = np.full((3, 3), -1)  # garbage everywhere the truth is ignored
    prediction[1, 1] = 2
    assert confusion_matrix(prediction, truth, 3).sum() == 1
    assert confusion_matrix(prediction, truth, 3)[2, 2] == 1
    assert confusion_matrix(prediction, np.full((3, 3), 7), 3, ignore_index=7).sum() == 0
    with pytest.raises(ValueError, match="prediction has class values outside 0..2"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="truth has class values outside"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 5), 3)


@pytest.fixture(scope="module")
def segmenter_batch2(tiny_config):
    return make_segmenter(tiny_config, batch_size=2)  # evaluation batches images: runs save per batch


def _voc_masks(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = {}
    for i in range(count):
        mask = rng.integers(0, 21, (36 + 6 * i, 52 - 2 * i), dtype=np.uint8)
        mask[:2] = 255  # VOC's border
        masks[f"2007_{i:06d}"] = mask
    return masks


def _expected_confusion(segmenter_batch2, dataset, names, **predict_args) -> np.ndarray:
    """Pixel counts written out per class with plain numpy, from Segmenter.predict's labels."""
    queries = [n for synonyms in names for n in synonyms]
    owner = [c for c, synonyms in enumerate(names) for _ in synonyms]
    classes = len(names)
    confusion = np.zeros((classes, classes), np.int64)
    for index in range(len(dataset)):
        image, truth = dataset[index]
        labels = segmenter_batch2.predict(image, queries, templates="single", **predict_args).labels
        prediction = np.vectorize(lambda q: dataset.background_index if q < 0 else owner[q])(labels)
        for t in range(classes):
            for p in range(classes):
                confusion[t, p] = confusion[t, p] + np.sum((truth == t) & (prediction == p))
    return confusion


@pytest.mark.parametrize("window", [None, SlidingWindow(32, 16, short_side=48)])
def test_evaluation_equals_counts_by_hand(tmp_path, segmenter_batch2, window):
    write_voc(tmp_path, _voc_masks(3))
    dataset = open_dataset("voc21", tmp_path)
    names = dataset.prompt_names()
    report = evaluate_segmentation(segmenter_batch2, dataset, templates="single", sliding_window=window, progress=False)
    expected = _expected_confusion(segmenter_batch2, dataset, names, sliding_window=window)
    np.testing.assert_array_equal(report.metrics.confusion, expected)
    scored = sum(int((dataset[i][1] != 255).sum()) for i in range(len(dataset)))
    assert report.metrics.confusion.sum() == scored and report.num_images == 3 and not report.failures
    assert report.protocol["sliding_window"] == (
        None if window is None else {"crop": 32, "stride": 16, "short_side": 48}
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sliding_window=SlidingWindow(12, 12)), "multiples of the patch size"),
        (dict(sliding_window=SlidingWindow(8, 8, short_side=4)), "image size 4 is smaller"),
        (dict(background_threshold=1.5), r"probability in \[0, 1\], got 1.5"),
    ],
)
def test_options_that_fail_every_image_are_refused_before_any_is_read(tmp_path, segmenter_batch2, options, message):
    write_voc(tmp_path, _voc_masks(2))
    dataset = open_dataset("voc21", tmp_path)
    images = sorted((tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))
    assert len(images) == 2
    for path in images:
        path.write_bytes(b"not an image")  # read, any of them would fail on its own
    with pytest.raises(ValueError, match=message):
        evaluate_segmentation(segmenter_batch2, dataset, templates="single", progress=False, **options)


def test_background_threshold_predicts_the_background_class(tmp_path, segmenter_batch2):
    write_voc(tmp_path, _voc_masks(2))
    voc21 = open_dataset("voc21", tmp_path)
    names = [("background",), ("cat",), ("dog",)] + [(f"class {i}",) for i in range(18)]
    plain = evaluate_segmentation(segmenter_batch2, voc21, names=names, templates="single", progress=False)
    thresholded = evaluate_segmentation(
        segmenter_batch2, voc21, names=names, templates="single", background_threshold=1.0, progress=False
    )
    # Every winner probability is below 1, so everything becomes background.
    assert thresholded.metrics.confusion[:, 1:].sum() == 0
    assert thresholded.metrics.confusion.sum() == plain.metrics.confusion.sum()
    with pytest.raises(ValueError, match="voc20 has no background class"):
        evaluate_segmentation(
            segmenter_batch2, open_dataset("voc20", tmp_path), background_threshold=0.5, progress=False
        )
    with pytest.raises(ValueError, match="2 class names given for 21 classes"):
        evaluate_segmentation(segmenter_batch2, voc21, names=[("a",), ("b",)], progress=False)


def test_reduce_zero_label_dataset_never_scores_other(tmp_path, segmenter_batch2):
    masks = {"ADE_val_1": np.zeros((20, 24), np.uint8), "ADE_val_2": np.full((20, 24), 3, np.uint8)}
    masks["ADE_val_1"][5:9, 5:9] = 7
    write_ade(tmp_path, masks)
    report = evaluate_segmentation(
        segmenter_batch2, open_dataset("ade20k", tmp_path), templates="single", progress=False
    )
    assert report.metrics.confusion.sum() == 16 + 20 * 24  # "other" (0) pixels are not scored
    assert report.metrics.pixels[6] == 16 and report.metrics.pixels[2] == 480


# dataset, writer, raw value -> class index (255: not scored), written by hand from each layout's docs
LAYOUTS = [
    ("voc21", write_voc, {0: 0, 1: 1, 15: 15, 20: 20, 255: 255}),
    ("voc20", write_voc, {0: 255, 1: 0, 15: 14, 20: 19, 255: 255}),
    ("context60", write_context, {0: 0, 5: 5, 59: 59}),
    ("context59", write_context, {0: 255, 5: 4, 59: 58}),
    ("cocostuff", partial(write_coco_stuff, converted=True), {0: 0, 80: 80, 170: 170, 255: 255}),
    ("cocostuff", partial(write_coco_stuff, converted=False), {0: 0, 12: 11, 91: 80, 181: 170, 255: 255}),
    ("ade20k", write_ade, {0: 255, 1: 0, 150: 149, 77: 76}),
    ("cityscapes", partial(write_cityscapes, train_ids=True), {0: 0, 10: 10, 18: 18, 255: 255}),
    ("cityscapes", partial(write_cityscapes, train_ids=False), {7: 0, 23: 10, 33: 18, 0: 255, 4: 255}),
]  # fmt: skip


@pytest.mark.parametrize("name,writer,mapping", LAYOUTS)
def test_every_layout_evaluates_to_counts_by_hand(tmp_path, segmenter_batch2, name, writer, mapping):
    rng = np.random.default_rng(len(mapping))
    values = np.array(sorted(mapping), np.uint8)
    masks = {f"aachen_{i:06d}_000019": rng.choice(values, size=(18 + 5 * i, 26)) for i in range(2)}
    writer(tmp_path, masks)
    dataset = open_dataset(name, tmp_path)
    classes = [(c,) for c in dataset.classes]
    report = evaluate_segmentation(segmenter_batch2, dataset, names=classes, templates="single", progress=False)
    expected = np.zeros((len(classes),) * 2, np.int64)
    for index, key in enumerate(masks):
        truth = np.vectorize(mapping.get)(masks[key])
        (path,) = [p for p in tmp_path.rglob(f"{key}*") if p.suffix == ".jpg" or p.name.endswith("_leftImg8bit.png")]
        image = np.array(Image.open(path).convert("RGB"))
        prediction = segmenter_batch2.predict(image, dataset.classes, templates="single").labels
        assert dataset.sample_id(index) == key
        for t in np.unique(truth[truth != 255]):
            for p in np.unique(prediction):
                expected[t, p] += np.sum((truth == t) & (prediction == p))
    np.testing.assert_array_equal(report.metrics.confusion, expected)
    assert report.metrics.miou == pytest.approx(SegmentationMetrics(dataset.classes, expected).miou)


class DiesAfter:
    """A dataset that is killed (KeyboardInterrupt) when asked for its ``n``-th image; counts reads."""

    def __init__(self, dataset, n: int | None):
        self.dataset, self.n, self.reads = dataset, n, 0

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if self.n is not None and self.reads >= self.n:
            raise KeyboardInterrupt
        self.reads += 1
        return self.dataset[index]


def test_interrupted_evaluation_resumes_to_the_same_numbers(tmp_path, segmenter_batch2):
    write_voc(tmp_path, _voc_masks(5))
    dataset = open_dataset("voc21", tmp_path)
    state = tmp_path / "state"
    kwargs = dict(templates="single", progress=False, state_dir=state, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_segmentation(segmenter_batch2, DiesAfter(dataset, 3), **kwargs)
    saved = json.loads((state / "rank00000-of-00001.json").read_text())
    assert saved["done"] == 2  # the whole batches done before the kill (batch size 2)
    resumed_reader = DiesAfter(dataset, None)
    resumed = evaluate_segmentation(segmenter_batch2, resumed_reader, **kwargs)
    assert resumed_reader.reads == 3  # only what was left
    whole = evaluate_segmentation(segmenter_batch2, dataset, templates="single", progress=False)
    np.testing.assert_array_equal(resumed.metrics.confusion, whole.metrics.confusion)
    assert resumed.metrics.miou == whole.metrics.miou
    with pytest.raises(ValueError, match=r"other settings \(differs in: templates\)"):
        evaluate_segmentation(segmenter_batch2, dataset, templates="short", progress=False, state_dir=state)


def _forge(path: Path, **fields) -> None:
    """Edit a saved state as a forger who knows the format would (checksum recomputed, see test_runs)."""
    data = json.loads(path.read_text())
    data.update(fields)
    body = {k: v for k, v in data.items() if k != "checksum"}
    data["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(data))


def test_forged_state_is_refused_and_restart_starts_over(tmp_path, segmenter_batch2):
    """Issue 10 item 9: an edited partial state changed the reported mIoU; now it is refused, naming --restart."""
    world = open_dataset("synthetic", None)
    state = tmp_path / "state"
    kwargs = dict(limit=4, templates="single", progress=False, state_dir=state, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_segmentation(segmenter_batch2, DiesAfter(world, 2), **kwargs)
    path = state / "rank00000-of-00001.json"
    saved = json.loads(path.read_text())
    _forge(path, done=10**6)
    with pytest.raises(ValueError, match=r"done=1000000 is not an item count in 0\.\.4.*--restart"):
        evaluate_segmentation(segmenter_batch2, world, **kwargs)
    confusion = np.array(saved["sums"]["confusion"]["values"])
    confusion[0] += 10**6  # all of class 0 right: a better mIoU
    forged = {"confusion": {"shape": saved["sums"]["confusion"]["shape"], "values": confusion.tolist()}}
    _forge(path, done=saved["done"], sums=forged)
    path.write_text(path.read_text().replace('"checksum": "', '"checksum": "0'))  # a hand edit, not re-hashed
    with pytest.raises(ValueError, match="checksum does not match.*--restart"):
        evaluate_segmentation(segmenter_batch2, world, **kwargs)
    clear_state(state, DistInfo())  # what --restart does
    restarted = evaluate_segmentation(segmenter_batch2, world, **kwargs)
    fresh = evaluate_segmentation(segmenter_batch2, world, limit=4, templates="single", progress=False)
    np.testing.assert_array_equal(restarted.metrics.confusion, fresh.metrics.confusion)


def test_changed_split_list_or_process_count_is_not_resumed(tmp_path, segmenter_batch2):
    """Issue 10 item 9: after the split list changed, a resumed run mixed old and new images."""
    masks = _voc_masks(4)
    voc = write_voc(tmp_path, masks)
    state = tmp_path / "state"
    kwargs = dict(templates="single", progress=False, state_dir=state, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_segmentation(segmenter_batch2, DiesAfter(open_dataset("voc21", tmp_path), 2), **kwargs)
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    ids = split.read_text().split()
    split.write_text("\n".join([ids[1], ids[0], *ids[2:]]) + "\n")  # same images, other order
    with pytest.raises(ValueError, match=r"differs in: sample_ids_sha256\).*--restart"):
        evaluate_segmentation(segmenter_batch2, open_dataset("voc21", tmp_path), **kwargs)
    split.write_text("\n".join(ids[:3]) + "\n")  # one image fewer
    with pytest.raises(ValueError, match=r"differs in: num_samples, sample_ids_sha256\)"):
        evaluate_segmentation(segmenter_batch2, open_dataset("voc21", tmp_path), **kwargs)
    clear_state(state, DistInfo())
    dataset = open_dataset("voc21", tmp_path)
    # Rank 0 of 2 alone (no process group: it keeps its own share's sums), then one process on its state.
    half = evaluate_segmentation(segmenter_batch2, dataset, dist=DistInfo(0, 2), **kwargs)
    assert half.metrics.confusion.sum() == sum(int((masks[k] != 255).sum()) for k in ids[:3:2])
    with pytest.raises(ValueError, match=r"another number of processes \(rank00000-of-00002.json\).*--restart"):
        evaluate_segmentation(segmenter_batch2, dataset, **kwargs)


def test_eval_command_restart_discards_a_bad_state(tmp_path, tiny_config, capsys):
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    state = tmp_path / "state"
    state.mkdir()
    (state / "rank00000-of-00001.json").write_text('{"done": 1000000}')
    args = ["eval", "--dataset", "synthetic", "--limit", "2", "--workers", "0", "--state-dir", str(state)]
    args += ["--clip", f"local-dir:{clip}", "--device", "cpu", "--templates", "single"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"cannot resume from {state / 'rank00000-of-00001.json'}: not a state file" in error
    assert "start over with --restart" in error
    assert main([*args, "--restart"]) == 0
    assert "mIoU" in capsys.readouterr().out and not state.exists()


def test_a_bad_image_is_reported_and_the_rest_scored(tmp_path, segmenter_batch2):
    voc = write_voc(tmp_path, _voc_masks(3))
    (voc / "JPEGImages" / "2007_000001.jpg").write_bytes(b"not a jpeg")
    report = evaluate_segmentation(
        segmenter_batch2, open_dataset("voc21", tmp_path), templates="single", progress=False
    )
    assert [f["id"] for f in report.failures] == ["2007_000001"]
    assert "cannot decode image file" in report.failures[0]["error"]
    masks = _voc_masks(3)
    assert report.metrics.confusion.sum() == sum(int((masks[k] != 255).sum()) for k in ("2007_000000", "2007_000002"))


@pytest.mark.parametrize("command", ["eval", "classify"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--json" in text and "--state-dir" in text and "--pacl-weights" in text


def test_synthetic_world_through_the_same_evaluator(tmp_path, tiny_config, segmenter_batch2, capsys):
    from pacl_fast.data.synthetic import SYNTHETIC_TEMPLATES

    world = open_dataset("synthetic", None)
    report = evaluate_segmentation(segmenter_batch2, world, limit=3, progress=False)
    assert report.protocol["templates"] == list(SYNTHETIC_TEMPLATES) and report.num_images == 3
    expected = np.zeros((6, 6), np.int64)
    for index in range(3):
        image, truth = world[index]
        prediction = segmenter_batch2.predict(image, world.classes, templates=SYNTHETIC_TEMPLATES).labels
        for t in range(6):
            for p in range(6):
                expected[t, p] += np.sum((truth == t) & (prediction == p))
    np.testing.assert_array_equal(report.metrics.confusion, expected)
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    args = ["eval", "--dataset", "synthetic", "--limit", "2", "--json", str(tmp_path / "s.json"), "--workers", "0"]
    assert main([*args, "--clip", f"local-dir:{clip}", "--device", "cpu"]) == 0
    assert "| star" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["num_images"] == 2


def test_eval_command_names_a_wrong_folder(tmp_path, capsys):
    assert main(["eval", "--dataset", "ade20k", "--root", str(tmp_path)]) == 2
    assert f"is not a ade20k folder (tried {tmp_path}/annotations" in capsys.readouterr().err
    assert main(["eval", "--dataset", "voc21"]) == 2
    assert "give its folder (--root)" in capsys.readouterr().err


def _cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_killed_cli_evaluation_resumes_and_two_ranks_equal_one(tmp_path, tiny_config):
    """pacl-fast eval killed mid-run, run again, equals the same evaluation on 2 gloo ranks, exactly."""
    masks = _voc_masks(12, seed=3)
    write_voc(tmp_path / "data", masks)
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    save_image(np.zeros((70, 45, 3), np.uint8), voc / "JPEGImages" / "2007_000005.jpg")  # wrong size: reported
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    weights = write_tiny_pacl(clip, tmp_path / "pacl.safetensors")
    common = [
        "eval", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--clip", f"local-dir:{clip}",
        "--pacl-weights", str(weights), "--templates", "single", "--device", "cpu", "--workers", "0",
        "--sliding-window", "32,16,48", "--save-every", "1",
    ]  # fmt: skip
    one = [sys.executable, "-m", "pacl_fast", *common, "--json", str(tmp_path / "one.json")]
    state = tmp_path / "one.json.partial" / "rank00000-of-00001.json"
    process = subprocess.Popen(one, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the evaluation finished before it could be killed"
    done_before = json.loads(state.read_text())["done"]
    assert 0 < done_before < 12
    finished = subprocess.run(one, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1, finished.stderr  # the wrong-size image is a failure
    assert "2007_000005" in finished.stderr and "mIoU" in finished.stdout and "| tvmonitor" in finished.stdout
    assert not state.parent.exists()  # a finished run clears its partial results
    two = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pacl_fast", *common, "--json", str(tmp_path / "two.json"),
    ]  # fmt: skip
    ranks = subprocess.run(two, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert "2007_000005" in ranks.stderr, ranks.stderr[-3000:]
    single, double = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert single["confusion"] == double["confusion"]
    assert single["mIoU"] == double["mIoU"] and single["aAcc"] == double["aAcc"]
    assert single["num_images"] == 12 and single["num_failed"] == 1
    assert [f["id"] for f in double["failures"]] == ["2007_000005"]
    scored = sum(int((m != 255).sum()) for k, m in masks.items() if k != "2007_000005")
    assert np.sum(single["confusion"]) == scored


def test_batched_evaluation_equals_one_image_at_a_time(tmp_path, tiny_config):
    """Issue 15: evaluation decodes in workers and batches images of one canvas size through the model;
    the numbers must be those of segmenting each image alone with Segmenter.predict."""
    masks = _voc_masks(6)
    masks.update({f"2008_{i:06d}": np.full((36, 52), i, np.uint8) for i in range(3)})  # equal sizes: shared batches
    write_voc(tmp_path, masks)
    dataset = open_dataset("voc21", tmp_path)
    batched = evaluate_segmentation(make_segmenter(tiny_config, batch_size=4), dataset, templates="single",
                                    progress=False, workers=2)  # fmt: skip
    one = make_segmenter(tiny_config, batch_size=1)
    expected = np.zeros((21, 21), np.int64)
    queries = [name for synonyms in dataset.prompt_names() for name in synonyms]
    query_class = np.repeat(np.arange(21), [len(s) for s in dataset.prompt_names()])
    for index in range(len(dataset)):
        image, truth = dataset[index]
        labels = one.predict(image, queries, templates="single").labels
        expected += confusion_matrix(query_class[labels], truth, 21).numpy()
    np.testing.assert_array_equal(batched.metrics.confusion, expected)


def authors_input(image: np.ndarray, protocol, segmenter_batch2):
    """The repositories' network input for one image, written out: mmcv's ``Resize(scale=(2048, S),
    keep_ratio=True)`` (``rescale_size``: factor ``min(2048 / long, S / short)``, sides ``int(x * f + 0.5)``;
    ``cv2.resize`` INTER_LINEAR on the uint8 image), normalised; then padded bottom/right to the patch
    multiple as the engine's canvas is. Returns (Prepared, the unpadded normalised input [1, 3, h, w])."""
    from pacl_fast.images import Geometry, Prepared, normalize

    cv2 = opencv()
    h, w = image.shape[:2]
    factor = min(max(2048, protocol.short_side) / max(h, w), min(2048, protocol.short_side) / min(h, w))
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)  # [h', w', 3] uint8
    pixels = normalize(
        torch.from_numpy(resized).permute(2, 0, 1).float() / 255, segmenter_batch2.mean, segmenter_batch2.std
    )
    p = segmenter_batch2.patch_size
    canvas = (-(-new_h // p) * p, -(-new_w // p) * p)
    padded = torch.nn.functional.pad(pixels, (0, canvas[1] - new_w, 0, canvas[0] - new_h))
    return Prepared(padded, Geometry((h, w), (new_h, new_w), canvas, p)), pixels[None]


@pytest.mark.parametrize(
    "name, dataset_name",
    [("sclip", "voc21"), ("clearclip", "voc21"), ("sclip", "cocoobject")],
)
def test_windowed_protocol_presets_drive_the_evaluation(tmp_path, tiny_config, name, dataset_name):
    """Windowed presets (SCLIP VOC21 with its area and probability thresholds; ClearCLIP's 448/224 windows;
    SCLIP COCO-Object, whose names repeat "bed"): held to mmcv's resize, the window, thresholds and
    de-duplicated queries written out from the preset's own numbers."""
    from layouts import write_coco_object

    from pacl_fast.protocols import get_protocol

    opencv()
    protocol = get_protocol(name, dataset_name)
    masks = _voc_masks(2)
    if dataset_name == "cocoobject":
        masks = {f"{i:012d}": np.where(m == 255, 0, m % 81).astype(np.uint8) for i, m in enumerate(masks.values())}
        write_coco_object(tmp_path, masks, converted=True)
    else:
        write_voc(tmp_path, masks)
    dataset = open_dataset(dataset_name, tmp_path)
    segmenter_batch2 = make_segmenter(tiny_config, image_size=protocol.short_side, logit_scale=protocol.logit_scale)
    report = evaluate_segmentation(segmenter_batch2, dataset, protocol=protocol, progress=False)
    assert not report.failures
    window = SlidingWindow(protocol.slide_crop, protocol.slide_stride, protocol.short_side)
    unique = sorted(set(protocol.queries))
    texts = segmenter_batch2.encode_labels(unique, "imagenet")[[unique.index(q) for q in protocol.queries]]
    classes = dataset.num_classes
    expected = np.zeros((classes, classes), np.int64)
    for index in range(len(dataset)):
        image, truth = dataset[index]
        dense = segmenter_batch2.image_logits(
            authors_input(image, protocol, segmenter_batch2)[0], texts, window
        )  # [Q, H, W]
        labels = protocol.postprocess(dense).numpy()
        expected += confusion_matrix(labels, truth, classes).numpy()
    np.testing.assert_array_equal(report.metrics.confusion, expected)


def protocol_labels_of(refined: torch.Tensor, protocol) -> np.ndarray:
    from pacl_fast.protocols import protocol_labels

    thresholds = {"prob_threshold": protocol.prob_threshold, "area_threshold": protocol.area_threshold}
    return protocol_labels(refined, protocol.query_class, logit_scale=protocol.logit_scale, **thresholds).numpy()


def test_protocol_presets_drive_the_evaluation(tmp_path, tiny_config):
    """NACLIP's VOC21 preset: whole image resized as mmcv does to short side 336, 26 stuff names for background,
    logit scale 40, probability threshold 0.1, PAMR on image-size cosine logits guided by NACLIP's image (the
    network input resized back to the original size, bilinear: naclip.py l. 130). Held to the same steps
    written out; the resize and the guide are what issue 19 items 2 and 3 changed (bicubic before, and the
    original image as the guide)."""
    from pacl_fast.protocols import get_protocol
    from pacl_fast.refine import pamr

    opencv()
    protocol = get_protocol("naclip", "voc21")
    masks = _voc_masks(2)
    write_voc(tmp_path, masks)
    dataset = open_dataset("voc21", tmp_path)
    segmenter_batch2 = make_segmenter(tiny_config, image_size=protocol.short_side, logit_scale=protocol.logit_scale)
    report = evaluate_segmentation(segmenter_batch2, dataset, protocol=protocol, progress=False)
    assert report.protocol["eval_protocol"]["name"] == "naclip" and report.protocol["logit_scale"] == 40
    unique = list(dict.fromkeys(protocol.queries))
    texts = segmenter_batch2.encode_labels(unique, "imagenet")[[unique.index(q) for q in protocol.queries]]
    expected = np.zeros((21, 21), np.int64)
    for index in range(len(dataset)):
        image, truth = dataset[index]
        prepared, network_input = authors_input(image, protocol, segmenter_batch2)
        assert min(prepared.geometry.resized_size) == 336
        patches = segmenter_batch2.encoder.encode_image(prepared.pixels[None])
        logits = torch.nn.functional.normalize(patches.float(), dim=-1) @ texts.T  # [1, h, w, Q]
        dense = segmenter_batch2.head.upsample(logits, truth.shape, prepared.geometry.grid_extent)  # [1, Q, H, W]
        guide = torch.nn.functional.interpolate(network_input, size=truth.shape, mode="bilinear", align_corners=False)
        refined = pamr(guide, dense, 10, (8, 16))[0]
        labels = protocol_labels_of(refined, protocol)
        expected += confusion_matrix(labels, truth, 21).numpy()
    np.testing.assert_array_equal(report.metrics.confusion, expected)
    with pytest.raises(ValueError, match="build the segmenter with image_size=336, logit_scale=40"):
        evaluate_segmentation(make_segmenter(tiny_config), dataset, protocol=protocol, progress=False)
    with pytest.raises(ValueError, match="a protocol sets the class names"):
        evaluate_segmentation(segmenter_batch2, dataset, protocol=protocol, templates="single", progress=False)
    with pytest.raises(ValueError, match="preset is for voc21, the dataset is synthetic"):
        evaluate_segmentation(
            segmenter_batch2, open_dataset("synthetic", None), protocol=protocol, limit=1, progress=False
        )
