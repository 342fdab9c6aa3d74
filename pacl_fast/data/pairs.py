"""Image-caption pairs from files: CSV/TSV tables and WebDataset tar shards.

* :class:`CsvPairs`: open_clip's ``CsvDataset`` convention, a table with an image-path column
  (default ``filepath``) and a caption column (default ``title``), tab-separated for ``.tsv``
  and comma-separated for ``.csv``; relative paths are read from the table's folder.
* :func:`webdataset_pairs`: img2dataset's layout, ``shards/{00000..00099}.tar`` whose members
  are ``<key>.jpg|png|jpeg|webp`` + ``<key>.txt``, read with the ``webdataset`` library.

In both, an undecodable or incomplete sample is skipped and counted; it never stops a run.
Images come out as ``[3, S, S] uint8``: short side resized to ``S``, centre crop (CLIP's
training preprocessing).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from pacl_fast.data.stream import SampleError
from pacl_fast.images import IMAGE_SUFFIXES, load_image, square_crop

#: WebDataset fields holding the image, in order of preference.
IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)


class CsvPairs:
    """A CSV/TSV table of (image path, caption) as a :class:`~pacl_fast.data.stream.PairSource`."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        *,
        image_key: str = "filepath",
        caption_key: str = "title",
        separator: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"pairs table not found: {self.path}")
        separator = separator or ("\t" if self.path.suffix.lower() == ".tsv" else ",")
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            missing = [key for key in (image_key, caption_key) if key not in columns]
            if missing:
                raise ValueError(
                    f"{self.path}: no column {missing} (columns are {columns}); "
                    f"pass image_key= / caption_key= (open_clip's --csv-img-key / --csv-caption-key)"
                )
            self.rows = [(row[image_key], row[caption_key]) for row in reader]
        if not self.rows:
            raise ValueError(f"{self.path}: the table has no rows")
        self.size = len(self.rows)
        self.image_size = image_size

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        image_path, caption = self.rows[index]
        if not caption or not caption.strip():
            raise SampleError(f"{self.path} row {index}: empty caption")
        full_path = Path(image_path) if Path(image_path).is_absolute() else self.path.parent / image_path
        try:
            image = load_image(full_path)
        except (FileNotFoundError, ValueError, TypeError) as error:
            raise SampleError(str(error)) from error
        return square_crop(image, self.image_size), caption.strip()


class SkipCounter:
    """A webdataset handler that skips a broken sample and counts it (per worker process)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: Exception) -> bool:
        self.count += 1
        return True  # keep going


def _decode_sample(sample: dict, image_size: int) -> tuple[torch.Tensor, str]:
    image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_bytes is None or "txt" not in sample:
        raise SampleError(f"sample {sample.get('__key__')} lacks an image or a caption")
    caption = sample["txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        raise SampleError(f"sample {sample.get('__key__')} has an empty caption")
    try:
        image = load_image(Image.open(io.BytesIO(image_bytes)))
    except Exception as error:  # any decoder failure means a corrupt member
        raise SampleError(f"sample {sample.get('__key__')}: {error}") from error
    return square_crop(image, image_size), caption


class WebDatasetPairs(torch.utils.data.IterableDataset):
    """``(image, caption, skipped)`` from WebDataset shards, split across ranks and workers.

    Shards are shuffled per epoch with the seed; each rank, then each worker, takes its own
    shards (so use at least ``world_size * num_workers`` shards). Broken members and samples are
    skipped; ``skipped`` on the next good sample says how many were dropped before it.
    Resuming restarts the shard order of epoch ``start_epoch`` (mid-epoch positions are not
    restored, as in open_clip).
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_epoch: int = 0,
    ):
        super().__init__()
        try:
            import webdataset  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "WebDataset shards need the webdataset library: pip install 'pacl-fast[train]'"
            ) from error
        from braceexpand import braceexpand

        self.urls = [u for pattern in ([urls] if isinstance(urls, str) else urls) for u in braceexpand(pattern)]
        missing = [u for u in self.urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"WebDataset shards not found: {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.image_size, self.seed = image_size, seed
        self.rank, self.world_size, self.start_epoch = rank, world_size, start_epoch

    def _my_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        shards = [self.urls[i] for i in order.tolist()]
        mine = shards[self.rank :: self.world_size]
        if not mine:
            raise ValueError(f"{len(self.urls)} shards cannot feed {self.world_size} ranks: use more shards")
        return mine[worker::workers]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, int]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        counter = SkipCounter()
        reported = 0
        epoch = self.start_epoch
        while True:
            shards = self._my_shards(epoch, worker, workers)
            if not shards:
                return  # more workers than this rank's shards: this worker has nothing to read
            pipeline = wds.DataPipeline(
                wds.SimpleShardList(shards),
                wds.tarfile_to_samples(handler=counter),
            )
            for sample in pipeline:
                try:
                    image, caption = _decode_sample(sample, self.image_size)
                except SampleError:
                    counter.count += 1
                    continue
                yield image, caption, counter.count - reported
                reported = counter.count
            epoch += 1
