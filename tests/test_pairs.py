import os
import tarfile

import numpy as np
import pytest
import torch
from helpers import png_bytes, write_shard
from torch.utils.data import DataLoader

from pacl_fast.data.pairs import CsvPairs, ShardPosition, WebDatasetPairs
from pacl_fast.data.stream import DataError, PairStream, collate_pairs
from pacl_fast.files import NotARegularFileError
from pacl_fast.images import square_crop


def test_csv_pairs_skip_and_count_bad_rows(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "broken.png").write_bytes(b"garbage")
    rows = [f"{i}.png\tcaption {i}" for i in range(6)] + ["missing.png\tgone", "broken.png\tbroken", "0.png\t "]
    table = tmp_path / "pairs.tsv"
    table.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    source = CsvPairs(table, 32)
    assert source.size == 9
    stream = PairStream(source, batch_size=3, seed=0)
    loader = DataLoader(stream, batch_size=3, collate_fn=collate_pairs)
    batches = [b for b, _ in zip(loader, range(6))]
    assert all(b["images"].shape == (3, 3, 32, 32) for b in batches)
    captions = [c for b in batches for c in b["captions"]]
    assert set(captions) <= {f"caption {i}" for i in range(6)}
    # 18 positions = 2 epochs of 9 rows: each of the 3 bad rows came up twice
    assert sum(b["skipped"] for b in batches) >= 6


def test_csv_columns_are_checked(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("path,text\na.png,hello\n")
    with pytest.raises(ValueError, match=r"no column \['filepath', 'title'\]"):
        CsvPairs(table, 32)
    assert CsvPairs(table, 32, image_key="path", caption_key="text").size == 1
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CsvPairs(tmp_path / "nope.csv", 32)


def test_webdataset_corrupt_member_is_skipped_and_counted(tmp_path):
    write_shard(
        tmp_path / "00000.tar",
        [
            ("a.png", png_bytes(1)),
            ("a.txt", b"a red circle"),
            ("b.jpg", b"\xff\xd8\xff corrupt jpeg"),
            ("b.txt", b"broken"),
            ("c.png", png_bytes(2)),
            ("c.txt", b"a blue square"),
            ("d.txt", b"caption without an image"),
            ("e.png", png_bytes(3)),
            ("e.txt", b"a star"),
            ("f.png", b"x" * 20000),  # over the member cap below: never read
            ("f.txt", b"too large"),
        ],
    )
    write_shard(tmp_path / "00001.tar", [("g.png", png_bytes(4)), ("g.txt", b"a cross")])
    dataset = WebDatasetPairs(str(tmp_path / "{00000..00001}.tar"), 24, 4, seed=0, max_member_bytes=10000)
    batch = next(iter(dataset))
    assert set(batch["captions"]) == {"a red circle", "a blue square", "a star", "a cross"}
    assert batch["images"].shape == (4, 3, 24, 24) and batch["images"].dtype == torch.uint8
    assert batch["skipped"] == 3  # the corrupt jpeg, the image-less sample, the member over the cap
    with pytest.raises(FileNotFoundError, match="shards not found"):
        WebDatasetPairs(str(tmp_path / "{00005..00006}.tar"), 24, 4)
    with pytest.raises(ValueError, match="2 shards cannot feed 1 rank"):
        WebDatasetPairs(str(tmp_path / "{00000..00001}.tar"), 24, 4, streams=3)


def write_numbered_shards(folder, shards=6, per_shard=5, bad_every=4):
    """Shards ``00000.tar``... of samples ``s{shard}_{i}`` (caption = key); every ``bad_every``-th image is garbage."""
    number = 0
    for shard in range(shards):
        members = []
        for i in range(per_shard):
            key = f"s{shard}_{i}"
            image = b"not a png" if number % bad_every == bad_every - 1 else png_bytes(number, size=(9, 11))
            members += [(f"{key}.png", image), (f"{key}.txt", key.encode())]
            number += 1
        write_shard(folder / f"{shard:05d}.tar", members)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def keys_per_step(dataset, steps, workers):
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    batches = [batch for batch, _ in zip(loader, range(steps))]
    return [batch["keys"] for batch in batches], batches


def test_webdataset_batches_are_a_function_of_the_step_and_resume_exactly(tmp_path):
    pattern = write_numbered_shards(tmp_path)  # 6 shards x 5 samples, a quarter of the images broken
    make = dict(urls=pattern, image_size=8, batch_size=3, streams=2, seed=3)
    straight, straight_batches = keys_per_step(WebDatasetPairs(**make), 14, workers=2)
    assert keys_per_step(WebDatasetPairs(**make), 14, workers=0)[0] == straight  # workers do not change the data

    # Independently: stream j reads the shards permutation(seed, pass)[j::2], the usable samples in order.
    def stream_samples(stream):
        for epoch in range(3):
            order = np.random.default_rng([3, epoch]).permutation(6)[stream::2]
            for shard in order:
                for i in range(5):
                    number = shard * 5 + i
                    if number % 4 != 3:
                        yield f"s{shard}_{i}"

    expected = {j: stream_samples(j) for j in (0, 1)}
    assert straight == [[next(expected[step % 2]) for _ in range(3)] for step in range(14)]
    assert [b["captions"] for b in straight_batches] == straight

    for stop in (5, 9):  # a run stopped after `stop` steps keeps each stream's last consumed position
        positions = {b["stream"]: ShardPosition(*b["position"]) for b in straight_batches[:stop]}
        resumed = WebDatasetPairs(**make, start_step=stop, positions=positions)
        assert keys_per_step(resumed, 14 - stop, workers=2)[0] == straight[stop:], stop

    with pytest.raises(ValueError, match="position"):
        WebDatasetPairs(**make, positions={0: ShardPosition(0, 9, 0)})


def test_webdataset_broken_shard_and_unusable_stream(tmp_path, caplog):
    members = [
        ("a.png", png_bytes(1)),
        ("a.txt", b"a"),
        ("b.png", png_bytes(2)),
        ("b.txt", b"b"),
        ("c.png", png_bytes(3)),
    ]
    write_shard(tmp_path / "00000.tar", members)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        cut = tar.getmember("c.png").offset_data + 100
    whole = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(whole[:cut])  # cut inside c.png: the shard breaks off there
    write_shard(tmp_path / "00001.tar", [("d.png", png_bytes(4)), ("d.txt", b"d")])
    dataset = WebDatasetPairs([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], 8, 1, seed=0)
    batches = [batch for batch, _ in zip(dataset, range(3))]
    keys = [key for batch in batches for key in batch["keys"]]
    assert {"a", "d"} <= set(keys) and sum(batch["skipped"] for batch in batches) >= 1
    assert "00000.tar" in caplog.text and "going on with the next shard" in caplog.text

    write_shard(tmp_path / "bad.tar", [("x.png", b"garbage"), ("x.txt", b"x"), ("y.txt", b"no image")])
    with pytest.raises(DataError, match=r"no usable sample .*bad\.tar.*x"):
        next(iter(WebDatasetPairs(str(tmp_path / "bad.tar"), 8, 1)))


def test_csv_stream_whose_every_path_is_bad_names_them(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("filepath,title\n" + "".join(f"gone{i}.png,caption {i}\n" for i in range(5)))
    stream = PairStream(CsvPairs(table, 16), batch_size=2)
    with pytest.raises(DataError, match=r"gone\d\.png.*not found.*; .*gone\d\.png") as error:
        next(iter(stream))
    assert "pairs.csv line" in str(error.value)


def test_square_crop_keeps_the_centre():
    image = np.zeros((3, 40, 80), np.uint8)
    image[:, :, 20:60] = 255
    cropped = square_crop(torch.from_numpy(image), 20)
    assert cropped.shape == (3, 20, 20) and cropped[:, :, 3:-3].min() >= 250 and cropped.max() == 255


@pytest.mark.timeout(30)
def test_a_fifo_where_the_pairs_table_is_expected_is_refused_without_blocking(tmp_path):
    """Issue 23 item 3: reading a FIFO waits for a writer, forever."""
    table = tmp_path / "pairs.csv"
    os.mkfifo(table)
    with pytest.raises(NotARegularFileError, match=f"{table}: expected a regular file, found a FIFO"):
        CsvPairs(table, 32)
