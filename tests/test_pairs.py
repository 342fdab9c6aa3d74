import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from pacl_fast.data.pairs import CsvPairs, WebDatasetPairs
from pacl_fast.data.stream import PairStream, collate_pairs
from pacl_fast.images import square_crop


def png_bytes(seed, size=(40, 30)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


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


def write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


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
        ],
    )
    write_shard(tmp_path / "00001.tar", [("f.png", png_bytes(4)), ("f.txt", b"a cross")])
    dataset = WebDatasetPairs(str(tmp_path / "{00000..00001}.tar"), 24, seed=0)
    samples = []
    for sample in dataset:
        samples.append(sample)
        if len(samples) == 4:
            break
    captions = {caption for _, caption, _ in samples}
    assert captions == {"a red circle", "a blue square", "a star", "a cross"}
    assert all(image.shape == (3, 24, 24) for image, _, _ in samples)
    assert sum(skipped for _, _, skipped in samples) == 2  # the corrupt jpeg and the image-less sample
    with pytest.raises(FileNotFoundError, match="shards not found"):
        WebDatasetPairs(str(tmp_path / "{00005..00006}.tar"), 24)


def test_square_crop_keeps_the_centre():
    image = np.zeros((3, 40, 80), np.uint8)
    image[:, :, 20:60] = 255
    import torch

    cropped = square_crop(torch.from_numpy(image), 20)
    assert cropped.shape == (3, 20, 20) and cropped[:, :, 3:-3].min() >= 250 and cropped.max() == 255
