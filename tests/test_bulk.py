"""Bulk segmentation: folders, file lists, WebDataset shards; skip what exists; two ranks, each image once."""

import io
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_segmenter
from layouts import random_image, save_image, write_tiny_clip
from PIL import Image

from pacl_fast.bulk import collect_inputs, iterate_shard, segment_bulk

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["circle", "square", "sky"]


@pytest.fixture(scope="module")
def segmenter(tiny_config):
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


def test_folder_run_writes_each_image_skips_done_ones_and_reports_bad_ones(tmp_path, segmenter):
    paths = _folder(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    seen = []
    summary = segment_bulk(
        segmenter,
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
        expected = segmenter.predict(path, LABELS, templates="single").labels
        np.testing.assert_array_equal(labels, expected.astype(np.uint8))
        assert Image.open(out / f"{key}_overlay.png").size == Image.open(path).size
    assert not list(out.rglob("*.tmp"))

    (out / "sub" / "img03_labels.png").unlink()  # as if killed before this one was written
    again = segment_bulk(segmenter, collect_inputs([tmp_path / "in"]), LABELS, out, templates="single", progress=False)
    assert (again.written, again.skipped, len(again.failures)) == (1, 4, 1)
    redo = segment_bulk(
        segmenter,
        collect_inputs([tmp_path / "in"]),
        LABELS,
        tmp_path / "labels-only",
        templates="single",
        overlays=False,
        progress=False,
    )
    assert redo.written == 5 and not list((tmp_path / "labels-only").rglob("*_overlay.png"))
    with pytest.raises(ValueError, match=r"made with other settings \(differs in: labels\).*--overwrite"):
        segment_bulk(segmenter, collect_inputs([tmp_path / "in"]), ["cat", "dog"], out, templates="single")
    with pytest.raises(ValueError, match=r"differs in: templates"):
        segment_bulk(segmenter, collect_inputs([tmp_path / "in"]), LABELS, out, progress=False)
    redone = segment_bulk(
        segmenter, collect_inputs([tmp_path / "in"]), ["cat", "dog"], out, overwrite=True, progress=False
    )
    assert redone.written == 5 and redone.skipped == 0


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, fields in samples:
            for extension, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def _png_bytes(image: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


def test_webdataset_shards(tmp_path, segmenter):
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
    assert [key for key, _ in iterate_shard(tmp_path / "shard-000.tar")] == ["s000", "s001", "nested/s002"]
    inputs = collect_inputs([tmp_path / "shard-000.tar", tmp_path / "shard-001.tar", tmp_path / "gone.tar"])
    out = tmp_path / "out"
    summary = segment_bulk(segmenter, inputs, LABELS, out, templates="single", progress=False, workers=2)
    assert summary.written == 4
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labels.png"))
    assert written == ["nested/s002_labels.png", "s000_labels.png", "s001_labels.png", "s005_labels.png"]
    failures = dict(summary.failures)
    assert "no image field" in failures[f"{tmp_path / 'shard-001.tar'}:s003"]
    assert "cannot decode png" in failures[f"{tmp_path / 'shard-001.tar'}:s004"]
    assert "cannot read shard" in failures[str(tmp_path / "gone.tar")]
    expected = segmenter.predict(images["s000"], LABELS, templates="single").labels
    np.testing.assert_array_equal(np.array(Image.open(out / "s000_labels.png")), expected.astype(np.uint8))
    again = segment_bulk(segmenter, inputs, LABELS, out, templates="single", progress=False)
    assert (again.written, again.skipped) == (0, 4)


def test_two_ranks_write_every_image_once_and_resume(tmp_path, tiny_config):
    paths = _folder(tmp_path / "in", 9)
    (tmp_path / "in" / "zz-broken.png").write_bytes(b"nope")
    clip = write_tiny_clip(tmp_path / "clip", tiny_config)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pacl_fast", "segment", str(tmp_path / "in"), "--labels", ",".join(LABELS), "--out", str(out),
        "--clip", f"local-dir:{clip}", "--templates", "single", "--device", "cpu", "--batch-size", "2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode != 0  # the broken image fails the run, after everything else is written
    lines = Counter(re.findall(r"^(\S+\.png): circle", first.stdout, flags=re.M))
    assert lines == Counter({str(p): 1 for p in paths}), first.stdout  # each image by exactly one rank
    assert "9 written, 0 skipped (already written), 1 failed" in first.stdout
    assert f"1 of 10 images failed:\n  {tmp_path / 'in' / 'zz-broken.png'}" in first.stderr
    assert len(list(out.rglob("*_labels.png"))) == 9 and len(list(out.rglob("*_overlay.png"))) == 9

    for key in ("img00", "sub/img05", "img08"):  # as if the job had been killed before these
        (out / f"{key}_labels.png").unlink()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert "3 written, 6 skipped (already written), 1 failed" in second.stdout, second.stdout + second.stderr
    redone = re.findall(r"^(\S+\.png): circle", second.stdout, flags=re.M)
    assert sorted(Path(p).name for p in redone) == ["img00.png", "img05.png", "img08.png"]


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
