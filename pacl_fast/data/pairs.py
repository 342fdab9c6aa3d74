"""Image-caption pairs from files: CSV/TSV tables and WebDataset tar shards.

* :class:`CsvPairs`: open_clip's ``CsvDataset`` convention, a table with an image-path column
  (default ``filepath``) and a caption column (default ``title``), tab-separated for ``.tsv``
  and comma-separated for ``.csv``; relative paths are read from the table's folder.
* :class:`WebDatasetPairs`: img2dataset's layout, ``shards/{00000..00099}.tar`` whose members
  are ``<key>.jpg|png|jpeg|webp`` + ``<key>.txt``, read with the project's one shard reader
  (:func:`pacl_fast.data.shards.iterate_samples`: webdataset's grouping, bounded member reads),
  as batches that are a pure function of (seed, step, rank), so that resuming is exact.

In both, an undecodable or incomplete sample is skipped and counted; it never stops a run.
Images come out as ``[3, S, S] uint8``: short side resized to ``S``, centre crop (CLIP's
training preprocessing).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pacl_fast.data.shards import DEFAULT_MAX_MEMBER_BYTES, MemberNotRead, ShardError, iterate_samples
from pacl_fast.data.stream import QUOTED_FAILURES, DataError, SampleError
from pacl_fast.files import open_regular
from pacl_fast.images import IMAGE_SUFFIXES, load_image, square_crop

logger = logging.getLogger(__name__)

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
        if not self.path.exists():
            raise FileNotFoundError(f"pairs table not found: {self.path}")
        separator = separator or ("\t" if self.path.suffix.lower() == ".tsv" else ",")
        with open_regular(self.path) as raw, io.TextIOWrapper(raw, newline="", encoding="utf-8") as f:
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
        where = f"{self.path} line {index + 2}"  # line 1 is the header
        if not caption or not caption.strip():
            raise SampleError(f"{where}: empty caption")
        full_path = Path(image_path) if Path(image_path).is_absolute() else self.path.parent / image_path
        try:
            image = load_image(full_path)
        except (FileNotFoundError, ValueError, TypeError) as error:
            raise SampleError(f"{where}: {error}") from error
        return square_crop(image, self.image_size), caption.strip()


@dataclass(frozen=True)
class ShardPosition:
    """Where a WebDataset stream stands: in its pass ``epoch`` over its shards, after ``sample`` samples
    (usable or not) of the ``shard``-th shard of that pass's list."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0


def decode_sample(sample: dict, image_size: int) -> tuple[torch.Tensor, str]:
    """A sample of :func:`~pacl_fast.data.shards.iterate_samples` -> ``(image [3, S, S] uint8, caption)``,
    or :class:`SampleError` saying why it cannot be used."""
    where = f"{sample.get('__url__')} sample {sample.get('__key__')!r}"
    if "__error__" in sample:
        raise SampleError(f"{where}: {sample['__error__']}")
    image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    caption_bytes = sample.get("txt")
    if image_bytes is None or caption_bytes is None:
        raise SampleError(f"{where} lacks an image or a caption")
    for value in (image_bytes, caption_bytes):
        if isinstance(value, MemberNotRead):
            raise SampleError(f"{where}: {value}")
    caption = caption_bytes.decode("utf-8", errors="replace").strip()
    if not caption:
        raise SampleError(f"{where} has an empty caption")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image's own limit decides
            image = load_image(Image.open(io.BytesIO(image_bytes)))
    except Exception as error:  # any decoder failure means a corrupt member
        raise SampleError(f"{where}: {error}") from error
    return square_crop(image, image_size), caption


class WebDatasetPairs(IterableDataset):
    """Batches of image-caption pairs from WebDataset shards, each a pure function of (seed, step, rank).

    The shards feed ``world_size * streams`` streams. In its pass ``e`` over the data, stream ``g``
    reads the shards ``permutation(seed, e)[g :: world_size * streams]`` in order, sample after
    sample (each stream makes its passes at its own pace). Rank ``r`` owns the streams
    ``r * streams + j``; its batch of step ``t`` is the next ``batch_size`` usable samples of its
    stream ``j = t % streams``. A batch therefore depends on the step, the rank and the data only,
    not on timing nor on how many DataLoader workers run, as long as ``streams`` is a multiple of
    the workers: worker ``w`` makes the steps ``start_step + w``, ``+ W``, ..., whose streams all
    share one residue mod ``W``, so each stream is read by one worker, in step order.

    Resuming exactly: every batch carries its ``stream`` and the :class:`ShardPosition` right after
    its last sample (as a list ``[epoch, shard, sample]``). A trainer keeps the latest position of
    each stream it consumed (not what workers prefetched) and, on resume, passes them back as
    ``positions`` with ``start_step``: each stream reopens its shard and skips that many samples
    (read, not decoded), so the resumed run reads exactly what an uninterrupted run would have.

    Unusable samples (undecodable, missing field, member over ``max_member_bytes``, empty caption)
    are skipped and counted in the batch's ``skipped``; a shard that breaks off ends early (its
    samples before the damage stand) with a warning. Use with ``DataLoader(dataset, batch_size=None)``.
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int,
        batch_size: int,
        *,
        streams: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        positions: dict[int, ShardPosition] | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        from braceexpand import braceexpand

        self.urls = [u for pattern in ([urls] if isinstance(urls, str) else urls) for u in braceexpand(pattern)]
        remote = [u for u in self.urls if "://" in u or u.startswith("pipe:")]
        if remote:
            raise ValueError(f"WebDataset shards must be local files, got {remote[:3]}")
        missing = [u for u in self.urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"WebDataset shards not found: {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for name, value in (("batch_size", batch_size), ("streams", streams), ("max_member_bytes", max_member_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if world_size * streams > len(self.urls):
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {world_size} rank(s) x {streams} stream(s): "
                "every stream needs a shard of its own; use more shards or fewer streams"
            )
        self.image_size, self.batch_size, self.streams, self.seed = image_size, batch_size, streams, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.max_member_bytes = max_member_bytes
        self.positions = dict(positions or {})
        for stream, position in self.positions.items():
            valid = (
                isinstance(stream, int)
                and 0 <= stream < streams
                and isinstance(position, ShardPosition)
                and all(isinstance(v, int) and v >= 0 for v in (position.epoch, position.shard, position.sample))
            )
            if not valid or position.shard > len(self.shards_of(stream, position.epoch)):  # == len: pass done
                raise ValueError(f"stream {stream!r}: position {position!r} does not fit {streams} stream(s) here")

    def shards_of(self, stream: int, epoch: int) -> list[str]:
        """The shards this rank's stream ``stream`` reads, in order, in its pass ``epoch``."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order[self.rank * self.streams + stream :: self.world_size * self.streams]]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.streams % workers:
            raise ValueError(f"{self.streams} WebDataset streams cannot be shared by {workers} DataLoader workers")
        readers: dict[int, _StreamReader] = {}
        for step in itertools.count(self.start_step + worker, workers):
            stream = step % self.streams
            if stream not in readers:
                readers[stream] = _StreamReader(self, stream, self.positions.get(stream, ShardPosition()))
            yield readers[stream].batch()


class _StreamReader:
    """One stream of :class:`WebDatasetPairs`: its samples in order from a position on, cut into batches."""

    def __init__(self, data: WebDatasetPairs, stream: int, start: ShardPosition):
        self.data, self.stream = data, stream
        self.usable = 0  # usable samples in the current pass
        self.failures: list[str] = []  # the current pass's first failures, for DataError
        self.samples = self._samples(start)

    def _samples(self, start: ShardPosition) -> Iterator[tuple[dict, ShardPosition]]:
        """``(sample, position after it)`` without end; a broken shard yields one ``__error__`` sample."""
        epoch, first_shard, skip = start.epoch, start.shard, start.sample
        while True:
            shards = self.data.shards_of(self.stream, epoch)
            whole_pass = first_shard == 0 and skip == 0
            self.usable, self.failures = 0, []
            for index in range(first_shard, len(shards)):
                count = 0
                try:
                    for sample in iterate_samples(shards[index], max_member_bytes=self.data.max_member_bytes):
                        count += 1
                        if count > skip:
                            yield sample, ShardPosition(epoch, index, count)
                except (ShardError, OSError) as error:
                    logger.warning("%s; going on with the next shard", error)
                    broken = {"__key__": f"#{count + 1}", "__url__": shards[index], "__error__": str(error)}
                    yield broken, ShardPosition(epoch, index + 1, 0)  # resume after the whole shard
                skip = 0
            if whole_pass and self.usable == 0:
                raise DataError(
                    f"WebDataset stream {self.data.rank * self.data.streams + self.stream} found no usable sample "
                    f"in a whole pass over its shards {shards[:3]}{'...' if len(shards) > 3 else ''}, "
                    f"e.g. {'; '.join(self.failures)}"
                )
            epoch, first_shard = epoch + 1, 0

    def batch(self) -> dict:
        """The next ``batch_size`` usable samples: ``images [B, 3, S, S] uint8``, ``captions``, ``keys``,
        ``skipped`` (samples dropped on the way), ``stream`` and ``position`` (after the last sample)."""
        images, captions, keys, skipped = [], [], [], 0
        while len(images) < self.data.batch_size:
            sample, position = next(self.samples)
            try:
                image, caption = decode_sample(sample, self.data.image_size)
            except SampleError as error:
                skipped += 1
                if len(self.failures) < QUOTED_FAILURES and str(error) not in self.failures:
                    self.failures.append(str(error))
                continue
            self.usable += 1
            images.append(image)
            captions.append(caption)
            keys.append(sample["__key__"])
        return {
            "images": torch.stack(images),
            "captions": captions,
            "keys": keys,
            "skipped": skipped,
            "stream": self.stream,
            "position": [position.epoch, position.shard, position.sample],
        }
