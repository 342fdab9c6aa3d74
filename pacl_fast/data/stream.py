"""Deterministic, resumable streams of training pairs, sharded across ranks and workers.

The batch a rank trains on at step ``s`` is a pure function of ``(seed, s, rank)``: positions
``[(s * world_size + rank) * batch_size, ... + batch_size)`` of one global sequence, mapped to
source items by a per-epoch permutation. So no item is used twice within an epoch, the data does
not depend on how many DataLoader workers run, and a run resumed at step ``s`` sees exactly what an
uninterrupted run would have.

A bad item (missing file, undecodable image, empty caption) is skipped and counted: its position
falls back to other items picked deterministically from the position, so batches keep their
size (DDP's all-gathers need equal sizes) and stay a pure function of the step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

MAX_SUBSTITUTES = 64


#: How many failures :class:`DataError` quotes.
QUOTED_FAILURES = 3


class SampleError(Exception):
    """An item of a pair source cannot be used (it is skipped and counted)."""


class DataError(RuntimeError):
    """The data cannot feed training at all (every item tried failed); the message quotes the first failures."""


class PairSource(Protocol):
    """Random-access image-caption pairs: ``load(i) -> (image [3, S, S] uint8, caption)``.

    ``size`` is the number of items, or None for an endless source. ``load`` raises
    :class:`SampleError` for an item that cannot be used.
    """

    size: int | None

    def load(self, index: int) -> tuple[torch.Tensor, str]: ...


class PairStream(IterableDataset):
    """Yields ``(image, caption, skipped)`` in step order; ``skipped`` counts items dropped for it.

    Use with ``DataLoader(stream, batch_size=batch_size, num_workers=W)``: worker ``w`` makes the
    steps ``start_step + w, + W, ...`` and the DataLoader interleaves them back into order.
    """

    def __init__(
        self,
        source: PairSource,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._permutations: dict[int, np.ndarray] = {}

    def positions_of_step(self, step: int) -> range:
        first = (step * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def _item_at(self, position: int) -> int:
        size = self.source.size
        if size is None:
            return position
        epoch, offset = divmod(position, size)
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(size)}
        return int(self._permutations[epoch][offset])

    def resolve(self, position: int) -> tuple[torch.Tensor, str, int]:
        """The pair at ``position``, or a deterministic substitute if that item is bad."""
        rng = None
        failures: list[str] = []
        index = self._item_at(position)
        for skipped in range(MAX_SUBSTITUTES):
            try:
                image, caption = self.source.load(index)
                return image, caption, skipped
            except SampleError as error:
                if len(failures) < QUOTED_FAILURES and str(error) not in failures:
                    failures.append(str(error))
                rng = rng or np.random.default_rng([self.seed, position, 1])
                size = self.source.size
                index = int(rng.integers(size)) if size else position + skipped + 1
        raise DataError(
            f"{MAX_SUBSTITUTES} items in a row failed near position {position}, e.g. {'; '.join(failures)}: "
            "is the data readable?"
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in itertools.count(self.start_step + worker, workers):
            for position in self.positions_of_step(step):
                yield self.resolve(position)


def collate_pairs(samples: list[tuple[torch.Tensor, str, int]]) -> dict:
    """``images [B, 3, S, S] uint8``, ``captions`` (list of B strings), ``skipped`` (int)."""
    images, captions, skipped = zip(*samples)
    return {"images": torch.stack(images), "captions": list(captions), "skipped": int(sum(skipped))}
