"""Bulk segmentation: folders, file lists, WebDataset shards; skip what exists; two ranks, each image once."""

import ctypes
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import killed_write, make_segmenter, write_shard, writer_in_progress
from layouts import random_image, save_image, write_tiny_clip
from PIL import Image

from pacl_fast.bulk import already_done, check_output_folder, collect_inputs, request_record, segment_bulk
from pacl_fast.data.shards import LINK_READ_FACTOR, MemberTooLarge, MemberUnusable, iterate_samples
from pacl_fast.images import SlidingWindow

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["circle", "square", "sky"]


@pytest.fixture(scope="module")
def segmenter_batch3(tiny_config):
    return make_segmenter(tiny_config, batch_size=3)


def _folder(root: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / ("sub" if i % 2 else "") / f"img{i:02d}.png"
        save_image(random_image((30 + 3 * i, 41), seed=i), path)
        paths.append(path)
    return paths


def test_inputs_from_folders_lists_and_shards(tmp_path):
    _folder(tmp_path / "photos", 4)
    save_image(random_image((8, 8), 0), tmp_path / "photos" / "img00.jpg")  # same key as img00.png
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    listed = [tmp_path / "x" / "a" / "p.jpg", tmp_path / "x" / "b" / "p.jpg"]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in listed) + "\n")
    inputs = collect_inputs(
        [tmp_path / "photos", tmp_path / "one.png", tmp_path / "shard-000.tar", tmp_path / "empty"],
        [tmp_path / "list.txt"],
    )
    assert [(f.key, f.path.name) for f in inputs.files] == [
        ("img00", "img00.jpg"),
        ("img02", "img02.png"),
        ("sub/img01", "img01.png"),
        ("sub/img03", "img03.png"),
        ("one", "one.png"),
        ("a/p", "p.jpg"),
        ("b/p", "p.jpg"),
    ]
    assert inputs.shards == [tmp_path / "shard-000.tar"]
    refused = dict(inputs.refused)
    assert "folder has no images" in refused[str(tmp_path / "empty")]
    assert "output name 'img00' is already taken by" in refused[str(tmp_path / "photos" / "img00.png")]
    with pytest.raises(FileNotFoundError, match="file list not found"):
        collect_inputs([], [tmp_path / "missing.txt"])


def test_folder_run_writes_each_image_skips_done_ones_and_reports_bad_ones(tmp_path, segmenter_batch3):
    paths = _folder(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    seen = []
    summary = segment_bulk(
        segmenter_batch3,
        collect_inputs([tmp_path / "in"]),
        LABELS,
        out,
        templates="single",
        progress=False,
        on_result=lambda key, source, result: seen.append(key),
    )
    keys = ["img00", "img02", "img04", "sub/img01", "sub/img03"]
    assert sorted(seen) == keys and summary.written == 5 and summary.skipped == 0
    assert [s for s, _ in summary.failures] == [str(tmp_path / "in" / "broken.png")]
    assert "cannot decode" in summary.failures[0][1]
    for key, path in zip(sorted(keys), sorted(paths, key=lambda p: p.relative_to(tmp_path / "in").as_posix())):
        labels = np.array(Image.open(out / f"{key}_labels.png"))
        expected = segmenter_batch3.predict(path, LABELS, templates="single").labels
        np.testing.assert_array_equal(labels, expected.astype(np.uint8))
        assert Image.open(out / f"{key}_overlay.png").size == Image.open(path).size
    assert not list(out.rglob("*.tmp"))

    (out / "sub" / "img03_labels.png").unlink()  # as if killed before this one was written
    again = segment_bulk(
        segmenter_batch3, collect_inputs([tmp_path / "in"]), LABELS, out, templates="single", progress=False
    )
    assert (again.written, again.skipped, len(again.failures)) == (1, 4, 1)
    redo = segment_bulk(
        segmenter_batch3,
        collect_inputs([tmp_path / "in"]),
        LABELS,
        tmp_path / "labels-only",
        templates="single",
        overlays=False,
        progress=False,
    )
    assert redo.written == 5 and not list((tmp_path / "labels-only").rglob("*_overlay.png"))
    with pytest.raises(ValueError, match=r"made with other settings \(differs in: labels\).*--overwrite"):
        segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "in"]), ["cat", "dog"], out, templates="single")
    with pytest.raises(ValueError, match=r"differs in: templates"):
        segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "in"]), LABELS, out, progress=False)
    redone = segment_bulk(
        segmenter_batch3, collect_inputs([tmp_path / "in"]), ["cat", "dog"], out, overwrite=True, progress=False
    )
    assert redone.written == 5 and redone.skipped == 0


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], mode: str = "w") -> None:
    """``helpers.write_shard`` from samples ``(key, {extension: bytes})``."""
    members = [(f"{key}.{extension}", data) for key, fields in samples for extension, data in fields.items()]
    write_shard(path, members, mode)


def _png_bytes(image: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


def test_webdataset_shards(tmp_path, segmenter_batch3):
    images = {f"s{i:03d}": random_image((24 + i, 33), seed=10 + i) for i in range(5)}
    _write_shard(
        tmp_path / "shard-000.tar",
        [
            ("s000", {"png": _png_bytes(images["s000"]), "txt": b"a caption"}),
            ("s001", {"jpg": _png_bytes(images["s001"], "JPEG"), "json": b"{}"}),
            ("nested/s002", {"png": _png_bytes(images["s002"])}),
        ],
    )
    _write_shard(
        tmp_path / "shard-001.tar",
        [
            ("s003", {"txt": b"no image here"}),
            ("s004", {"png": b"broken"}),
            ("s005", {"webp": _png_bytes(images["s004"], "WEBP")}),
        ],
    )
    assert [sample["__key__"] for sample in iterate_samples(tmp_path / "shard-000.tar")] == [
        "s000",
        "s001",
        "nested/s002",
    ]
    inputs = collect_inputs([tmp_path / "shard-000.tar", tmp_path / "shard-001.tar", tmp_path / "gone.tar"])
    out = tmp_path / "out"
    summary = segment_bulk(segmenter_batch3, inputs, LABELS, out, templates="single", progress=False, workers=2)
    assert summary.written == 4
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labels.png"))
    assert written == ["nested/s002_labels.png", "s000_labels.png", "s001_labels.png", "s005_labels.png"]
    failures = dict(summary.failures)
    assert "no image field" in failures[f"{tmp_path / 'shard-001.tar'}:s003"]
    assert "cannot decode png" in failures[f"{tmp_path / 'shard-001.tar'}:s004"]
    assert "cannot read shard" in failures[str(tmp_path / "gone.tar")]
    expected = segmenter_batch3.predict(images["s000"], LABELS, templates="single").labels
    np.testing.assert_array_equal(np.array(Image.open(out / "s000_labels.png")), expected.astype(np.uint8))
    again = segment_bulk(segmenter_batch3, inputs, LABELS, out, templates="single", progress=False)
    assert (again.written, again.skipped) == (0, 4)


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 45-byte PNG that declares width x height pixels (a header and no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _files_outside(root: Path, out: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_relative_to(out)}


def test_hostile_shard_keys_never_write_outside_out(tmp_path, segmenter_batch3):
    """Issue 10 item 1: ../x, sub/../../x, absolute and empty-segment keys wrote outside OUT."""
    png = _png_bytes(random_image((20, 28), seed=1))
    (tmp_path / "x_labels.png").write_bytes(b"precious")  # what ../x would have overwritten
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")  # a link inside OUT pointing out of it
    bad_keys = ["../x", "sub/../../y", f"{tmp_path}/abs/z", "a//b", "link/d", "e" * 230]
    # "./c" is no longer among them (issue 23 item 7): tar -C folder . names every member ./key, read as key.
    samples = [("ok", {"png": png}), ("./c", {"png": png}), *[(k, {"png": png}) for k in bad_keys]]
    _write_shard(tmp_path / "evil.tar", samples)
    before = _files_outside(tmp_path, out)
    summary = segment_bulk(
        segmenter_batch3, collect_inputs([tmp_path / "evil.tar"]), LABELS, out, templates="single", progress=False
    )
    assert summary.written == 2 and (out / "ok_labels.png").is_file() and (out / "ok_overlay.png").is_file()
    assert (out / "c_labels.png").is_file() and (out / "c_overlay.png").is_file()
    assert _files_outside(tmp_path, out) == before  # nothing made or changed outside OUT
    assert (tmp_path / "x_labels.png").read_bytes() == b"precious" and not list((tmp_path / "elsewhere").iterdir())
    failures = dict(summary.failures)
    assert sorted(failures) == sorted(f"{tmp_path / 'evil.tar'}:{k}" for k in bad_keys)
    assert all(why.startswith("cannot name its outputs: ValueError: output name") for why in failures.values())
    assert "resolves outside" in failures[f"{tmp_path / 'evil.tar'}:link/d"]


def test_one_bad_sample_never_stops_the_job(tmp_path, segmenter_batch3):
    """Issue 10 items 2 and 3: a decompression bomb, an oversized member, a damaged shard fail alone."""
    images = {f"s{i}": random_image((20 + i, 30), seed=i) for i in range(6)}
    _write_shard(
        tmp_path / "a.tar",
        [
            ("s0", {"png": _png_bytes(images["s0"])}),
            ("bomb", {"png": _bomb_png()}),  # over PIL's own limit: DecompressionBombError
            ("big", {"png": _bomb_png(9000, 9000)}),  # 81 MP: over max_pixels
            ("s1", {"png": _png_bytes(images["s1"])}),
            ("huge", {"png": b"\0" * 5000, "txt": b"x"}),  # over max_member_bytes
            ("s2", {"png": _png_bytes(images["s2"])}),
        ],
    )
    _write_shard(tmp_path / "cut.tar", [(f"s{i}", {"png": _png_bytes(images[f"s{i}"])}) for i in (3, 4, 5)])
    raw = (tmp_path / "cut.tar").read_bytes()
    sizes = [512 + -(-len(_png_bytes(images[f"s{i}"])) // 512) * 512 for i in (3, 4)]
    (tmp_path / "cut.tar").write_bytes(raw[: sum(sizes) + 600])  # breaks off inside s5's data
    _write_shard(tmp_path / "c.tar", [("after", {"png": _png_bytes(images["s0"])})])
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "bomb-file.png").write_bytes(_bomb_png())
    inputs = collect_inputs([tmp_path / "a.tar", tmp_path / "cut.tar", tmp_path / "c.tar", tmp_path / "files"])
    out = tmp_path / "out"
    largest = max(len(_png_bytes(image)) for image in images.values())
    summary = segment_bulk(
        segmenter_batch3, inputs, LABELS, out, templates="single", progress=False, max_member_bytes=largest
    )
    written = sorted(p.name.removesuffix("_labels.png") for p in out.glob("*_labels.png"))
    assert written == ["after", "s0", "s1", "s2", "s3", "s4"] and summary.written == 6
    failures = dict(summary.failures)
    shard = f"{tmp_path / 'a.tar'}:"
    assert "DecompressionBombError" in failures[shard + "bomb"]
    assert "over the limit max_pixels" in failures[shard + "big"]
    assert f"is 5000 bytes, over the limit of {largest}" in failures[shard + "huge"]
    assert "over PIL's pixel limit" in failures[str(tmp_path / "files" / "bomb-file.png")]
    assert "rest of the shard is skipped" in failures[str(tmp_path / "cut.tar")]
    assert "unexpected end of data" in failures[str(tmp_path / "cut.tar")]
    assert len(summary.failures) == 5
    with pytest.raises(ValueError, match="max_member_bytes must be >= 1"):
        segment_bulk(segmenter_batch3, inputs, LABELS, tmp_path / "o2", max_member_bytes=0, progress=False)
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("cut at a member boundary", "ends after member s4.png without tar's end-of-archive marker"),
        ("cut inside a header", "breaks off inside the header after member s4.png"),
        ("garbage header", "unreadable tar header after member s4.png"),
    ],
)
def test_a_shard_damaged_between_members_is_reported(tmp_path, segmenter_batch3, damage, message):
    """tarfile ends its loop quietly on these (as on the end-of-archive marker): the samples before the
    damage are written and the shard is reported, never silently shortened."""
    images = {f"s{i}": random_image((20, 30), seed=i) for i in (3, 4, 5)}
    _write_shard(tmp_path / "d.tar", [(key, {"png": _png_bytes(image)}) for key, image in images.items()])
    with tarfile.open(tmp_path / "d.tar") as tar:
        boundary = tar.getmember("s5.png").offset  # where s5's header starts
    raw = (tmp_path / "d.tar").read_bytes()
    damaged = {
        "cut at a member boundary": raw[:boundary],
        "cut inside a header": raw[: boundary + 100],
        "garbage header": raw[:boundary] + b"\x07" * 512 + raw[boundary + 512 :],
    }[damage]
    (tmp_path / "d.tar").write_bytes(damaged)
    summary = segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "d.tar"]), LABELS, tmp_path / "out",
                           templates="single", progress=False)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").glob("*_labels.png")) == ["s3_labels.png", "s4_labels.png"]
    failures = dict(summary.failures)
    assert message in failures[str(tmp_path / "d.tar")] and len(failures) == 1


def test_duplicate_keys_are_reported_with_both_sources(tmp_path, segmenter_batch3):
    """Issue 10 item 4: the same key in two shards, twice in one shard, or in a shard and a file was merged."""
    png = [_png_bytes(random_image((18, 22 + i), seed=i)) for i in range(4)]
    _write_shard(tmp_path / "one.tar", [("k", {"png": png[0]}), ("other", {"png": png[1]}), ("k", {"jpg": png[2]})])
    _write_shard(tmp_path / "two.tar", [("k", {"png": png[3]}), ("photo", {"png": png[1]})])
    save_image(random_image((16, 16), 9), tmp_path / "photo.png")
    inputs = collect_inputs([tmp_path / "photo.png", tmp_path / "one.tar", tmp_path / "two.tar"])
    out = tmp_path / "out"
    summary = segment_bulk(segmenter_batch3, inputs, LABELS, out, templates="single", progress=False)
    assert summary.written == 3  # photo, one.tar:k, one.tar:other
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    assert sorted(summary.failures) == [
        (f"{one}:k", f"output name 'k' is already taken by {one}:k"),
        (f"{two}:k", f"output name 'k' is already taken by {one}:k"),
        (f"{two}:photo", f"output name 'photo' is already taken by {tmp_path / 'photo.png'}"),
    ]
    expected = segmenter_batch3.predict(Image.open(io.BytesIO(png[0])), LABELS, templates="single").labels
    np.testing.assert_array_equal(np.array(Image.open(out / "k_labels.png")), expected)  # the first one stands
    again = segment_bulk(segmenter_batch3, inputs, LABELS, out, templates="single", progress=False)
    assert (again.written, again.skipped, sorted(again.failures)) == (0, 3, sorted(summary.failures))


def test_a_long_file_name_fails_alone(tmp_path, segmenter_batch3):
    """Issue 10 item 5: a 245+ character name crashed a folder run before any image (ENAMETOOLONG)."""
    paths = _folder(tmp_path / "in", 3)
    long_path = tmp_path / "in" / ("n" * 246 + ".png")
    save_image(random_image((16, 20), 3), long_path)
    _write_shard(
        tmp_path / "s.tar", [("m" * 246, {"png": b"x"}), ("fine", {"png": _png_bytes(random_image((9, 9), 0))})]
    )
    inputs = collect_inputs([tmp_path / "in", tmp_path / "s.tar"])
    summary = segment_bulk(segmenter_batch3, inputs, LABELS, tmp_path / "out", templates="single", progress=False)
    assert summary.written == len(paths) + 1
    failures = dict(summary.failures)
    assert "output name is 246 characters long, over the limit of 200" in failures[str(long_path)]
    assert "246 characters long" in failures[f"{tmp_path / 's.tar'}:{'m' * 246}"] and len(failures) == 2


@pytest.mark.parametrize("inside", ["in/out", "in"])
def test_out_inside_an_input_folder_never_segments_its_own_outputs(tmp_path, segmenter_batch3, inside):
    """Issue 10 item 6: each rerun segmented the previous outputs (2, 4, 8 new files...)."""
    _folder(tmp_path / "in", 3)
    out = tmp_path / inside
    for run in range(3):
        summary = segment_bulk(
            segmenter_batch3, collect_inputs([tmp_path / "in"]), LABELS, out, templates="single", progress=False
        )
        assert (summary.written, summary.skipped) == ((3, 0) if run == 0 else (0, 3)), run
        assert summary.left_out == (0 if run == 0 else 6) and not summary.failures
    assert len(list(out.rglob("*_labels.png"))) == 3


def test_an_input_named_like_an_output_outside_out_is_segmented(tmp_path, segmenter_batch3):
    """Only outputs *inside* OUT are left out of the scan: a photo called cat_overlay.png elsewhere is an input."""
    save_image(random_image((30, 41), seed=7), tmp_path / "photos" / "cat_overlay.png")
    summary = segment_bulk(
        segmenter_batch3,
        collect_inputs([tmp_path / "photos"]),
        LABELS,
        tmp_path / "out",
        templates="single",
        progress=False,
    )
    assert (summary.written, summary.left_out) == (1, 0) and (tmp_path / "out" / "cat_overlay_labels.png").is_file()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(labels=["circle", "circle"]), "duplicate"),
        (dict(templates=["no placeholder"]), "{}"),
        (dict(background_threshold=2.0), r"background_threshold must be a probability in \[0, 1\], got 2.0"),
        (dict(sliding_window=SlidingWindow(12, 12)), "multiples of the patch size"),
        (dict(sliding_window=SlidingWindow(8, 8, short_side=4)), "image size 4 is smaller than the model's patch"),
    ],
)
def test_settings_are_validated_before_the_settings_file_is_written(tmp_path, segmenter_batch3, change, message):
    """Issue 10 item 7: after a typo the settings file was written, and the corrected rerun was refused."""
    _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    arguments = dict(labels=LABELS, templates="single", background_threshold=None, sliding_window=None)
    with pytest.raises(ValueError, match=message):
        segment_bulk(
            segmenter_batch3, collect_inputs([tmp_path / "in"]), out_dir=out, progress=False, **(arguments | change)
        )
    assert not out.exists()
    summary = segment_bulk(
        segmenter_batch3, collect_inputs([tmp_path / "in"]), out_dir=out, progress=False, **arguments
    )
    assert summary.written == 2


def test_sliding_windows_and_background_threshold_through_bulk(tmp_path, segmenter_batch3):
    """Issue 13 items 9 and 12: bulk's label PNGs hold predict's labels (background 255), overlays keep background."""
    path = tmp_path / "in" / "wide.png"
    save_image(random_image((40, 90), seed=4), path)
    window = SlidingWindow(16, 8, short_side=32)
    plain = segmenter_batch3.predict(path, LABELS, templates="single", sliding_window=window)
    threshold = float(np.median(plain.scores))  # about half the pixels become background
    expected = segmenter_batch3.predict(
        path, LABELS, templates="single", sliding_window=window, background_threshold=threshold
    )
    background = expected.labels == -1
    assert 0 < background.mean() < 1
    out = tmp_path / "out"
    segment_bulk(
        segmenter_batch3,
        collect_inputs([tmp_path / "in"]),
        LABELS,
        out,
        templates="single",
        sliding_window=window,
        background_threshold=threshold,
        progress=False,
    )
    labels = np.array(Image.open(out / "wide_labels.png"))
    np.testing.assert_array_equal(labels, np.where(background, 255, expected.labels))
    overlay = np.array(Image.open(out / "wide_overlay.png"))
    original = np.array(Image.open(path))
    np.testing.assert_array_equal(overlay[background], original[background])
    assert (overlay[~background] != original[~background]).any(axis=-1).mean() > 0.9


def test_two_ranks_write_every_image_once_and_resume(tmp_path, tiny_config):
    """Files and shards (a .tar and a .tar.gz) over 2 gloo ranks; a key on both ranks is found at the end."""
    paths = _folder(tmp_path / "in", 9)
    (tmp_path / "in" / "zz-broken.png").write_bytes(b"nope")
    png = [_png_bytes(random_image((20 + i, 26), seed=40 + i)) for i in range(5)]
    shard0, shard1 = tmp_path / "shard-000.tar", tmp_path / "shard-001.tar.gz"
    _write_shard(shard0, [("s0", {"png": png[0]}), ("s1", {"png": png[1]}), ("dup", {"png": png[2]})])
    _write_shard(shard1, [("s2", {"png": png[3]}), ("dup", {"png": png[4]})], mode="w:gz")
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pacl_fast", "segment", str(tmp_path / "in"), str(shard0), str(shard1), "--labels", ",".join(LABELS),
        "--out", str(out), "--clip", f"local-dir:{clip}", "--templates", "single", "--device", "cpu",
        "--batch-size", "2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode != 0  # the broken image fails the run, after everything else is written
    lines = Counter(re.findall(r"^(\S+\.png|\S+\.tar(?:\.gz)?:\w+): circle", first.stdout, flags=re.M))
    # The two "dup" samples race: the later one finds the other's outputs done and skips. Whichever way,
    # shard-001's is the failure, and written + skipped counts every other image once.
    dups = [lines.pop(f"{shard}:dup", 0) for shard in (shard0, shard1)]
    assert 1 <= sum(dups) <= 2 and max(dups) == 1
    samples = [f"{shard0}:s0", f"{shard0}:s1", f"{shard1}:s2"]
    assert lines == Counter({str(p): 1 for p in [*paths, *samples]}), first.stdout  # each image by one rank
    written, skipped = map(
        int, re.search(r"(\d+) written, (\d+) skipped \(already written\), 2 failed", first.stdout).groups()
    )
    assert written + skipped == 13 and written >= 12
    assert "2 of 15 images failed:" in first.stderr
    assert f"  {tmp_path / 'in' / 'zz-broken.png'}: " in first.stderr
    duplicate = (
        f"  {shard1}:dup: output name 'dup' is also used by {shard0}:dup on rank 0; its files hold one of the two"
    )
    assert duplicate in first.stderr, first.stderr
    assert len(list(out.rglob("*_labels.png"))) == 13 and len(list(out.rglob("*_overlay.png"))) == 13
    expected = np.array(Image.open(io.BytesIO(png[3])))
    assert np.array(Image.open(out / "s2_overlay.png")).shape == expected.shape  # the .tar.gz sample

    for key in ("img00", "sub/img05", "img08", "s2"):  # as if the job had been killed before these
        (out / f"{key}_labels.png").unlink()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert "4 written, 9 skipped (already written), 2 failed" in second.stdout, second.stdout + second.stderr
    redone = re.findall(r"^(\S+\.png|\S+\.tar(?:\.gz)?:\w+): circle", second.stdout, flags=re.M)
    assert sorted(Path(p).name for p in redone) == ["img00.png", "img05.png", "img08.png", "shard-001.tar.gz:s2"]
    assert duplicate in second.stderr


def test_segment_command_with_a_file_list(tmp_path, tiny_config, capsys):
    from pacl_fast.cli import main

    paths = _folder(tmp_path / "in", 3)
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in paths))
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    args = ["segment", "--file-list", str(tmp_path / "list.txt"), "--labels", "a,b", "--out", str(tmp_path / "out")]
    args += ["--clip", f"local-dir:{clip}", "--templates", "single", "--device", "cpu", "--no-overlay", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 written, 0 skipped (already written), 0 failed" in out and ": a " not in out  # --quiet
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["img00_labels.png", "img02_labels.png", "sub/img01_labels.png"]
    assert main(["segment", "--labels", "a", "--out", str(tmp_path / "o")]) == 2
    assert "give images, folders, shards or --file-list" in capsys.readouterr().err


def _tar_folder(folder: Path, shard: Path, compress: bool = False) -> Path:
    """A shard made the common way, by GNU tar: ``tar -cf shard -C folder .`` (members ./key, links kept)."""
    subprocess.run(["tar", "-czf" if compress else "-cf", str(shard), "-C", str(folder), "."], check=True)
    return shard


def _labels_of(out: Path, key: str) -> np.ndarray:
    return np.array(Image.open(out / f"{key}_labels.png"))


def _expected(segmenter_batch3, image) -> np.ndarray:
    return segmenter_batch3.predict(image, LABELS, templates="single").labels.astype(np.uint8)


def test_a_shard_made_with_tar_of_a_folder_reads_dot_keys_by_their_names(tmp_path, segmenter_batch3):
    """Issue 23 item 7: ``tar -cf s.tar -C folder .`` names members ./key; every sample failed on the '.' segment."""
    images = {"a": random_image((20, 30), 1), "sub/b": random_image((22, 26), 2)}
    for key, image in images.items():
        save_image(image, tmp_path / "folder" / f"{key}.png")
    shard = _tar_folder(tmp_path / "folder", tmp_path / "s.tar")
    with tarfile.open(shard) as tar:
        assert {"./a.png", "./sub/b.png"} <= set(tar.getnames())
    assert sorted(sample["__key__"] for sample in iterate_samples(shard)) == ["a", "sub/b"]
    out = tmp_path / "out"
    summary = segment_bulk(segmenter_batch3, collect_inputs([shard]), LABELS, out, templates="single", progress=False)
    assert summary.written == 2 and not summary.failures
    for key, image in images.items():
        np.testing.assert_array_equal(_labels_of(out, key), _expected(segmenter_batch3, image))


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
def test_links_in_a_shard_are_read_or_reported_never_dropped(tmp_path, segmenter_batch3, compress):
    """Issue 23 item 8: hard links and symbolic links vanished without a word ('2 written, 0 failed' of 4)."""
    folder = tmp_path / "folder"
    a, b = random_image((20, 30), 1), random_image((24, 28), 2)
    save_image(a, folder / "a.png")
    save_image(b, folder / "b.png")
    save_image(random_image((16, 16), 3), tmp_path / "outside.png")  # must never be read through a link
    os.link(folder / "a.png", folder / "hard.png")  # tar stores the second of the two as a hard link
    (folder / "sub").mkdir()
    links = {
        "soft": "b.png",
        "sub/up": "../a.png",
        "abs": str(tmp_path / "outside.png"),
        "escape": "../outside.png",
        "dangling": "missing.png",
        "dir": "sub",
        "loop1": "loop2.png",
        "loop2": "loop1.png",
    }
    for key, target in links.items():
        (folder / f"{key}.png").symlink_to(target)
    shard = _tar_folder(folder, tmp_path / ("s.tar.gz" if compress else "s.tar"), compress)
    with tarfile.open(shard) as tar:
        kinds = Counter("link" if m.islnk() else "symlink" if m.issym() else "file" for m in tar if not m.isdir())
    assert kinds == Counter(file=2, link=1, symlink=8)
    out = tmp_path / "out"
    summary = segment_bulk(segmenter_batch3, collect_inputs([shard]), LABELS, out, templates="single", progress=False)
    assert summary.written == 5
    for key, image in {"a": a, "hard": a, "b": b, "soft": b, "sub/up": a}.items():
        np.testing.assert_array_equal(_labels_of(out, key), _expected(segmenter_batch3, image))
    failures = {source.rsplit(":", 1)[1]: why for source, why in summary.failures}
    assert sorted(failures) == ["abs", "dangling", "dir", "escape", "loop1", "loop2"]
    assert "is a symbolic link to /" in failures["abs"] and failures["abs"].endswith("outside the archive")
    assert failures["escape"].endswith("is a symbolic link to ../outside.png, outside the archive")
    assert failures["dangling"].endswith("to missing.png, which is not in the archive")
    assert failures["dir"].endswith("to sub, which is a folder")
    assert "more than 16 links in a row" in failures["loop1"]


def test_links_are_followed_forward_bounded_and_never_without_end(tmp_path):
    """A symbolic link may come before its target; a link to an oversized member is not read; FIFOs and
    devices are reported; and links cannot make a small shard read without end (LINK_READ_FACTOR)."""
    size, limit = 50_000, 100_000
    data = {"a": b"A" * size, "b": b"B" * size}

    def add(tar, name, payload=None, kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = 0 if payload is None else len(payload)
        tar.addfile(info, None if payload is None else io.BytesIO(payload))

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "fwd.bin", kind=tarfile.SYMTYPE, link="x/../a.bin")  # before its target
        add(tar, "a.bin", data["a"])
        add(tar, "big.bin", b"\0" * (limit + 1))
        add(tar, "tobig.bin", kind=tarfile.LNKTYPE, link="big.bin")
        add(tar, "pipe.bin", kind=tarfile.FIFOTYPE)
        add(tar, "dev.bin", kind=tarfile.CHRTYPE)
        add(tar, "b.bin", data["b"])
        for i in range(30):  # one target again and again: read once
            add(tar, f"same{i:02d}.bin", kind=tarfile.LNKTYPE, link="a.bin")
        for i in range(30):  # two targets in turn: each link reads, until the bound
            add(tar, f"turn{i:02d}.bin", kind=tarfile.LNKTYPE, link=("a.bin", "b.bin")[i % 2])
    samples = {s["__key__"]: s["bin"] for s in iterate_samples(tmp_path / "s.tar", max_member_bytes=limit)}
    assert samples["fwd"] == data["a"] and all(samples[f"same{i:02d}"] == data["a"] for i in range(30))
    assert str(samples["big"]) == str(MemberTooLarge("big.bin", limit + 1, limit))
    assert str(samples["tobig"]).endswith(f"(a link to big.bin) is {limit + 1} bytes, over the limit of {limit} "
                                          "(--max-member-bytes)")  # fmt: skip
    assert str(samples["pipe"]) == "tar member pipe.bin is a FIFO" and str(samples["dev"]).endswith("a device")
    shard_bytes = (tmp_path / "s.tar").stat().st_size  # a little over the tar's own size (its record padding)
    # fwd read a.bin; same*, and turn00 after them, find it read already; then each turn reads 50 kB, until
    # the bound; past it only a.bin, the member read last, is still given (for nothing).
    allowed = (LINK_READ_FACTOR * shard_bytes + limit) // size
    turns = [samples[f"turn{i:02d}"] for i in range(30)]
    first_refused = next(i for i, t in enumerate(turns) if not isinstance(t, bytes))
    assert allowed - 2 <= first_refused <= allowed < 30
    assert [i for i, t in enumerate(turns) if not isinstance(t, bytes)] == list(range(first_refused, 30, 2))
    for i, turn in enumerate(turns):
        if isinstance(turn, bytes):
            assert turn == data["ab"[i % 2]]
        else:
            assert isinstance(turn, MemberUnusable) and "links have read 4 times the shard" in str(turn)


def test_names_that_are_not_utf8_get_safe_output_names(tmp_path, segmenter_batch3):
    """Issue 23 item 9: a file name that is not UTF-8 (bytes caf\\xe9 on Linux) failed with a codec error.
    Its bytes become %XX; a real name that gives the same output name is refused, not merged."""
    folder, elsewhere = tmp_path / "in", tmp_path / "shard"
    odd = {name: random_image((20, 24 + i), i) for i, name in enumerate([b"caf\xe9", b"th\xe9", b"l\xe9"])}
    save_image(odd[b"caf\xe9"], Path(os.fsdecode(bytes(folder / "caf")) + os.fsdecode(b"\xe9.png")))
    save_image(random_image((18, 18), 7), folder / "caf%E9.png")  # the same output name from a UTF-8 name
    save_image(odd[b"th\xe9"], Path(os.fsdecode(bytes(elsewhere / "th") + b"\xe9.png")))
    shard = _tar_folder(elsewhere, tmp_path / "s.tar")
    listed = tmp_path / "listed" / os.fsdecode(b"l\xe9.png")
    save_image(odd[b"l\xe9"], listed)
    (tmp_path / "list.txt").write_bytes(bytes(listed) + b"\n")
    out = tmp_path / "out"
    summary = segment_bulk(segmenter_batch3, collect_inputs([folder, shard], [tmp_path / "list.txt"]), LABELS, out,
                           templates="single", progress=False)  # fmt: skip
    assert summary.written == 3
    assert sorted(os.fsencode(p.name) for p in out.glob("*_labels.png")) == [
        b"caf%E9_labels.png", b"l%E9_labels.png", b"th%E9_labels.png"
    ]  # fmt: skip
    for name, image in odd.items():
        key = name.decode("latin-1").replace("\xe9", "%E9")
        expected = image if name != b"caf\xe9" else random_image((18, 18), 7)  # caf%E9.png sorts first
        np.testing.assert_array_equal(_labels_of(out, key), _expected(segmenter_batch3, expected))
    ((source, why),) = summary.failures
    assert source.isprintable() and "\\udce9" in source and why.startswith("output name 'caf%E9' is already taken")


def test_an_inner_dot_dot_key_is_refused_even_inside_out(tmp_path, segmenter_batch3):
    """Issue 23 item 14: a shard key sub/../x stays inside OUT; it would write OUT/x beside the real x, make
    OUT/sub and escape duplicate detection. File lists name ../ paths by where they lead (normalised), so
    two lines for one file are a duplicate, not a '..' key."""
    x, other = random_image((20, 30), 1), random_image((26, 22), 2)
    samples = [("x", {"png": _png_bytes(x)}), ("sub/../x", {"png": _png_bytes(other)}), ("new/../y", {"png": b"-"})]
    _write_shard(tmp_path / "s.tar", samples)
    save_image(other, tmp_path / "photos" / "p.png")
    (tmp_path / "list.txt").write_text(f"{tmp_path}/photos/p.png\n{tmp_path}/photos/../photos/p.png\n")
    out = tmp_path / "out"
    summary = segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "s.tar"], [tmp_path / "list.txt"]), LABELS, out,
                           templates="single", progress=False)  # fmt: skip
    assert summary.written == 2 and not (out / "sub").exists() and not (out / "new").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith("_labels.png")) == ["p_labels.png", "x_labels.png"]
    np.testing.assert_array_equal(_labels_of(out, "x"), _expected(segmenter_batch3, x))
    failures = dict(summary.failures)
    for key in ("sub/../x", "new/../y"):
        assert f"output name {key!r} has an empty, '.' or '..' segment" in failures[f"{tmp_path / 's.tar'}:{key}"]
    assert "output name 'p' is already taken by" in failures[f"{tmp_path}/photos/../photos/p.png"]


def test_a_rerun_removes_what_killed_writes_left_but_never_a_live_writers_file(tmp_path, segmenter_batch3):
    """Issue 23 item 10: killed writes left .<name>.*.tmp files in OUT that no rerun removed. Another
    process still writing into OUT (another rank) keeps its temporary file."""
    _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    run = dict(labels=LABELS, out_dir=out, templates="single", progress=False)
    assert segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "in"]), **run).written == 3
    (out / "sub" / "img01_labels.png").unlink()
    dead = killed_write(out / "sub" / "img01_labels.png")  # killed while writing it
    with writer_in_progress(out / "elsewhere_labels.png") as (writer, live):
        again = segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "in"]), **run)
        assert (again.written, again.skipped) == (1, 2) and not dead.exists() and live.exists()
        writer.communicate(b"go on\n", timeout=30)
    assert not list(out.rglob("*.tmp")) and (out / "elsewhere_labels.png").read_bytes() == b"half and the rest"


@pytest.mark.timeout(120)
def test_a_run_that_wrote_nothing_does_not_lock_its_folder(tmp_path, segmenter_batch3):
    """Issue 24 item 6: two undecodable inputs, 0 written; a rerun with other labels was refused ('the label
    maps in OUT were made with other settings') although no label map existed. Settings files are read as
    hostile (issue 23 items 3 and 5): a FIFO or 100,000 nested brackets is a one-line refusal."""
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(b"not an image")
    out = tmp_path / "out"

    def run(labels):
        return segment_bulk(segmenter_batch3, collect_inputs([tmp_path / "in"]), labels, out, templates="single",
                            progress=False)  # fmt: skip

    assert (run(LABELS).written, len(run(["cat", "dog"]).failures)) == (0, 2)
    save_image(random_image((20, 30), 1), tmp_path / "in" / "c.png")
    assert run(["cat", "dog"]).written == 1
    with pytest.raises(ValueError, match=r"label maps in .* were made with other settings \(differs in: labels\)"):
        run(LABELS)
    manifest = out / ".pacl-segment.json"
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.raises(ValueError, match=r"cannot read the settings file .*FIFO.*--overwrite"):
        run(LABELS)
    manifest.unlink()
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"cannot read the settings file .*nested too deeply.*--overwrite"):
        run(LABELS)
    (out / "c_labels.png").unlink()  # no label map left: the unreadable settings file is replaced
    assert run(LABELS).written == 1 and json.loads(manifest.read_text())["labels"] == LABELS


def test_out_that_is_a_file_is_one_line_before_the_model_loads(tmp_path, tiny_config, capsys):
    """Issue 23 item 5: --out naming a file ended in a traceback, after the model had loaded."""
    from pacl_fast.cli import main

    save_image(random_image((20, 30), 1), tmp_path / "p.png")
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    (tmp_path / "file").write_text("x")
    for out, what in [("file", "is a file, not a folder"), ("file/sub", f"is inside {tmp_path / 'file'}, which is a")]:
        argv = ["segment", str(tmp_path / "p.png"), "--labels", "a,b", "--out", str(tmp_path / out)]
        assert main([*argv, "--clip", f"local-dir:{clip}", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pacl-fast segment: error: --out {tmp_path / out} {what}"), err
        assert "Segmenter(" not in err and "Traceback" not in err
    with pytest.raises(ValueError, match="out_dir .* is a file"):
        check_output_folder(tmp_path / "file")


def _without_root_override() -> None:
    """In a child process of root, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that file modes bind root as they bind any user (as ``setpriv --bounding-set``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_out_is_one_line_before_the_model_loads(tmp_path, tiny_config):
    """Issue 23 item 5: a read-only --out ended in a traceback (root writes anywhere: as root the command
    runs without the capability that overrides file modes)."""
    save_image(random_image((20, 30), 1), tmp_path / "p.png")
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for out in (read_only, read_only / "new"):
        command = [sys.executable, "-m", "pacl_fast", "segment", str(tmp_path / "p.png"), "--labels", "a,b",
                   "--out", str(out), "--clip", f"local-dir:{clip}", "--device", "cpu"]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                                preexec_fn=_without_root_override if os.geteuid() == 0 else None)  # fmt: skip
        assert result.returncode == 2, result.stderr
        where = "" if out == read_only else f" (cannot make it in {read_only})"
        expected = f"pacl-fast segment: error: --out {out} is not writable{where}: Permission denied\n"
        assert result.stderr.startswith(expected), result.stderr
        assert "Segmenter(" not in result.stderr and "Traceback" not in result.stderr
    assert list(read_only.iterdir()) == []


def test_a_finished_rerun_is_skipped_only_when_every_option_matches_the_record(tmp_path, segmenter_batch3, tiny_config):
    """Issue 22: the skip compared a hand-written list of options, so a forgotten option that changes the
    outputs gave '0 written, N skipped' without the work. It now compares the record the run writes, made
    of every option: one added later (``a_new_option``) is compared without anyone listing it."""
    _folder(tmp_path / "in", 3)
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    out = tmp_path / "out"
    options = dict(command="segment", images=[str(tmp_path / "in")], file_list=[], labels=LABELS, out=out,
                   templates="single", sliding_window=None, clip=f"local-dir:{clip}", pacl_weights=None,
                   clip_weights=None, backend="fast", quiet=False, workers=0, run=print)  # fmt: skip
    inputs = collect_inputs([tmp_path / "in"])
    record = request_record(options)
    segment_bulk(segmenter_batch3, inputs, LABELS, out, templates="single", progress=False, request=record)
    assert json.loads((out / ".pacl-segment.json").read_text())["request"] == record  # what is compared
    assert already_done(inputs, out, True, request_record(options)) == 3
    same = {"quiet": True, "workers": 4, "images": ["elsewhere"], "out": "elsewhere", "run": len}
    assert already_done(inputs, out, True, request_record({**options, **same})) == 3  # read, write, report
    for change in ({"templates": "short"}, {"sliding_window": SlidingWindow(16, 8)}, {"a_new_option": 1},
                   {"backend": "reference"}, {"clip_weights": str(clip / "open_clip_model.safetensors")},
                   {"no_overlay": True}):  # fmt: skip
        assert already_done(inputs, out, True, request_record({**options, **change})) is None, change
    weights = next(clip.glob("*.safetensors"))
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 60))  # a local-dir CLIP touched
    assert already_done(inputs, out, True, request_record(options)) is None


def test_a_rerun_with_an_option_the_old_list_forgot_loads_the_model(tmp_path, tiny_config, capsys):
    """Issue 22 through the command: --encoder-cache (another cache can hold another int8 calibration) was
    not in the list; a rerun with it skipped everything without loading the model."""
    from pacl_fast.cli import main

    _folder(tmp_path / "in", 3)
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    argv = ["segment", str(tmp_path / "in"), "--labels", "a,b", "--out", str(tmp_path / "out"), "--quiet"]
    argv += ["--clip", f"local-dir:{clip}", "--templates", "single", "--device", "cpu"]
    assert main(argv) == 0 and "3 written" in capsys.readouterr().out
    assert main(argv) == 0
    again = capsys.readouterr()
    assert "0 written, 3 skipped" in again.out and "Segmenter(" not in again.err  # the same options: skipped
    assert main([*argv, "--encoder-cache", str(tmp_path / "cache")]) == 0
    again = capsys.readouterr()
    assert "0 written, 3 skipped" in again.out and "Segmenter(" in again.err  # the model was loaded to check
