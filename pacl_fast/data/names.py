"""Class names with synonyms, as the training-free CLIP segmentation papers write them.

A class may be asked for with several names ("person, person in shirt, person in jeans"); its
score is the best of its names. The file format (SCLIP's ``configs/cls_*.txt``, also used by
ClearCLIP, ProxyCLIP, ...) is one class per line, synonyms separated by commas::

    sky, wall, tree, building        <- class 0 (e.g. VOC's background, said with stuff names)
    aeroplane                        <- class 1
    person, person in shirt          <- class 2

:class:`ClassQueries` flattens the names into the text queries a model scores and maps query
indices back to classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def parse_class_names(lines: Sequence[str], source: str = "class names") -> tuple[tuple[str, ...], ...]:
    """Lines ``"name[, synonym...]"`` -> one tuple of names per class (blank lines skipped)."""
    classes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        names = tuple(name.strip() for name in line.split(","))
        if not all(names):
            raise ValueError(f"{source}, line {number}: empty name in {line.strip()!r}; expected 'name[, synonym...]'")
        classes.append(names)
    if not classes:
        raise ValueError(f"{source} holds no class names")
    return tuple(classes)


def read_class_names(path: str | os.PathLike) -> tuple[tuple[str, ...], ...]:
    """Read a class-names file (one class per line, synonyms separated by commas)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file not found: {path}")
    return parse_class_names(path.read_text(encoding="utf-8").splitlines(), str(path))


@dataclass(frozen=True)
class ClassQueries:
    """Classes, each asked for with one or more names.

    ``queries`` are all names in class order; ``query_class[q]`` is the class of query ``q``.
    """

    names: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("ClassQueries needs at least one class")
        seen: dict[str, int] = {}
        for index, synonyms in enumerate(self.names):
            if not synonyms:
                raise ValueError(f"class {index} has no name")
            for name in synonyms:
                if name in seen:
                    raise ValueError(
                        f"name {name!r} is given for class {seen[name]} and class {index}; each name must be unique"
                    )
                seen[name] = index

    @classmethod
    def from_names(cls, names: Sequence[str | Sequence[str]]) -> ClassQueries:
        """One entry per class: a name, or a list of synonyms."""
        return cls(tuple((n,) if isinstance(n, str) else tuple(n) for n in names))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(name for synonyms in self.names for name in synonyms)

    @property
    def query_class(self) -> np.ndarray:
        """``[Q]`` int64: the class of each query."""
        return np.repeat(np.arange(len(self.names)), [len(s) for s in self.names])

    def labels_to_classes(self, labels: np.ndarray, none_class: int = -1) -> np.ndarray:
        """Query labels ``[H, W]`` (``-1`` = no query won) -> class labels ``[H, W]`` int64."""
        lookup = np.append(self.query_class, none_class)  # index -1 reads the last entry
        return lookup[labels.astype(np.int64)]

    def scores_to_classes(self, scores: torch.Tensor) -> torch.Tensor:
        """Query scores ``[B, Q]`` -> class scores ``[B, C]``: the best synonym of each class."""
        if scores.shape[-1] == len(self.names):
            return scores
        index = torch.as_tensor(self.query_class, device=scores.device)
        out = torch.full((*scores.shape[:-1], len(self.names)), float("-inf"), device=scores.device)
        return out.scatter_reduce(-1, index.expand_as(scores), scores.float(), reduce="amax")
