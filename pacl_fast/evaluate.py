"""Evaluation: segmentation mIoU on the benchmark layouts, zero-shot classification top-1/top-5.

Metrics are mmsegmentation's: a confusion matrix over pixels whose ground truth is not the
ignore index (bincount of ``C * truth + prediction``); per class
``IoU = TP / (truth + predicted - TP)`` and ``Acc = TP / truth``; mIoU and mAcc average the
classes that are defined (a class absent from both truth and prediction has no IoU); aAcc is
all true positives over all scored pixels.

Runs are single process or ``torchrun`` (each rank a strided share of the images, the integer
sums all-reduced at the end, so the numbers are exactly those of one process). With a state
directory, each rank rewrites its partial sums there atomically every few images; a killed run
started again with the same settings skips what it had done and ends with identical numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pacl_fast.data.classification import ImageFolder
from pacl_fast.data.names import ClassQueries
from pacl_fast.data.segmentation import SegmentationDataset
from pacl_fast.distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from pacl_fast.images import SlidingWindow
from pacl_fast.results import ImageError
from pacl_fast.segmenter import Segmenter
from pacl_fast.zeroshot import METHODS, ZeroShotClassifier

STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(
    prediction: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """``[C, C]`` int64 pixel counts, rows ground truth, columns prediction; ignored pixels skipped.

    Args:
        prediction: ``[...]`` class indices in ``0..C-1`` wherever ``truth`` is scored.
        truth: ``[...]`` class indices or ``ignore_index``, same shape.
    """
    prediction = torch.as_tensor(prediction).long().flatten()
    truth = torch.as_tensor(truth).long().flatten()
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction has {prediction.numel()} pixels, truth {truth.numel()}")
    scored = truth != ignore_index
    prediction, truth = prediction[scored], truth[scored]
    for name, values in (("truth", truth), ("prediction", prediction)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} has class values outside 0..{num_classes - 1} on scored pixels")
    return torch.bincount(truth * num_classes + prediction, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


@dataclass
class SegmentationMetrics:
    """Per-class IoU / accuracy (NaN where undefined) and their summaries, from a confusion matrix."""

    classes: tuple[str, ...]
    confusion: np.ndarray  # [C, C] int64, rows truth
    iou: np.ndarray = field(init=False)  # [C]
    accuracy: np.ndarray = field(init=False)  # [C]

    def __post_init__(self) -> None:
        confusion = np.asarray(self.confusion, dtype=np.int64)
        self.confusion = confusion
        true_positive = np.diag(confusion).astype(np.float64)
        truth = confusion.sum(axis=1).astype(np.float64)
        predicted = confusion.sum(axis=0).astype(np.float64)
        union = truth + predicted - true_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            self.iou = np.where(union > 0, true_positive / union, np.nan)
            self.accuracy = np.where(truth > 0, true_positive / truth, np.nan)

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou)) if np.isfinite(self.iou).any() else float("nan")

    @property
    def macc(self) -> float:
        return float(np.nanmean(self.accuracy)) if np.isfinite(self.accuracy).any() else float("nan")

    @property
    def aacc(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    @property
    def pixels(self) -> np.ndarray:
        """``[C]`` scored ground-truth pixels per class."""
        return self.confusion.sum(axis=1)

    def to_dict(self) -> dict[str, Any]:
        def number(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "mIoU": number(self.miou),
            "mAcc": number(self.macc),
            "aAcc": number(self.aacc),
            "per_class": [
                {"class": name, "IoU": number(iou), "Acc": number(acc), "pixels": int(pixels)}
                for name, iou, acc, pixels in zip(self.classes, self.iou, self.accuracy, self.pixels)
            ],
            "confusion": self.confusion.tolist(),
        }

    def table(self) -> str:
        """A markdown table per class and a summary line (percentages)."""

        def percent(x: float) -> str:
            return "-" if math.isnan(x) else f"{100 * x:.2f}"

        width = max(len("class"), *(len(c) for c in self.classes))
        lines = [f"| {'class':<{width}} |    IoU |    Acc |", f"|{'-' * (width + 2)}|-------:|-------:|"]
        for name, iou, acc in zip(self.classes, self.iou, self.accuracy):
            lines.append(f"| {name:<{width}} | {percent(iou):>6} | {percent(acc):>6} |")
        lines.append(f"\nmIoU {percent(self.miou)}  mAcc {percent(self.macc)}  aAcc {percent(self.aacc)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Resumable, shardable accumulation of integer sums


class RunState:
    """One rank's partial sums on disk, so that a killed evaluation resumes where it stopped.

    ``DIR/rank{r}-of-{w}.json`` holds the run's fingerprint (everything the numbers depend on),
    how many items of this rank's share are done (in order), the integer sums and the failures.
    It is rewritten atomically (temporary file, then rename), so a kill never leaves half a file.
    ``directory=None`` keeps nothing.
    """

    def __init__(self, directory: str | os.PathLike | None, fingerprint: dict[str, Any], dist: DistInfo):
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = json.loads(json.dumps(fingerprint))  # what a reload will compare with
        self.dist = dist
        self.path = self.directory / f"rank{dist.rank:05d}-of-{dist.world_size:05d}.json" if self.directory else None

    def load(self, sums: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor], list[dict]]:
        """``(done, sums, failures)`` saved by an earlier run, or a fresh start."""
        if self.directory is None or not self.directory.exists():
            return 0, sums, []
        others = [
            p.name
            for p in self.directory.glob("rank*-of-*.json")
            if not p.name.endswith(f"-of-{self.dist.world_size:05d}.json")
        ]
        if others:
            raise ValueError(
                f"state directory {self.directory} holds a run with another number of processes ({others[0]}); "
                f"resume with the same number of processes, or delete the directory to start over"
            )
        if not self.path.exists():
            return 0, sums, []
        saved = json.loads(self.path.read_text())
        if saved.get("version") != STATE_VERSION or saved.get("fingerprint") != self.fingerprint:
            old = saved.get("fingerprint", {})
            changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"state in {self.path} is from a run with other settings (differs in: "
                f"{', '.join(changed) or 'version'}); use the same settings to resume, or delete the directory "
                "to start over"
            )
        loaded = {}
        for name, template in sums.items():
            entry = saved["sums"][name]
            loaded[name] = torch.tensor(entry["values"], dtype=torch.int64).reshape(entry["shape"])
            if loaded[name].shape != template.shape:
                raise ValueError(
                    f"state in {self.path}: sum {name!r} has shape {entry['shape']}, expected {list(template.shape)}"
                )
        return int(saved["done"]), loaded, list(saved["failures"])

    def save(self, done: int, sums: dict[str, torch.Tensor], failures: list[dict]) -> None:
        if self.path is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "done": done,
            "sums": {k: {"shape": list(v.shape), "values": v.flatten().tolist()} for k, v in sums.items()},
            "failures": failures,
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(payload))
        os.replace(temporary, self.path)


def clear_state(directory: str | os.PathLike | None, dist: DistInfo) -> None:
    """Remove a finished run's state directory (rank 0, once every rank is done with it)."""
    barrier()
    if directory is not None and dist.is_main:
        shutil.rmtree(directory, ignore_errors=True)


class _Items(Dataset):
    """``(index, item, error)`` for the given dataset indices; a failed load is reported, not raised."""

    def __init__(self, load: Callable[[int], Any], indices: Sequence[int]):
        self.load = load
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Any, str | None]:
        index = self.indices[position]
        try:
            return index, self.load(index), None
        except (FileNotFoundError, ValueError, TypeError, OSError) as error:
            return index, None, f"{type(error).__name__}: {error}"


def _as_list(batch: list) -> list:
    return batch


def run_sharded(
    num_items: int,
    load: Callable[[int], Any],
    process: Callable[[list[tuple[int, Any]], dict[str, torch.Tensor]], list[tuple[int, str]]],
    sums: dict[str, torch.Tensor],
    *,
    dist: DistInfo,
    state: RunState,
    describe: Callable[[int], str],
    batch_size: int = 1,
    workers: int = 0,
    save_every: int = 20,
    save_seconds: float = 60.0,
    progress: bool = True,
    desc: str = "",
    postfix: Callable[[dict[str, torch.Tensor]], str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Load and process this rank's share of ``num_items``, resumably; return global sums and failures.

    ``load(index)`` runs in DataLoader workers; ``process(batch, sums)`` adds a batch of
    ``(index, item)`` into ``sums`` (int64 tensors) and returns ``(index, error)`` for the items
    it could not score. Items are shared by rank (``index % world_size``).
    """
    share = list(range(dist.rank, num_items, dist.world_size))
    done, sums, failures = state.load(sums)
    loader = DataLoader(_Items(load, share[done:]), batch_size=batch_size, num_workers=workers, collate_fn=_as_list)
    bar = tqdm(
        total=len(share),
        initial=done,
        disable=not (progress and dist.is_main),
        desc=desc + (f" (rank 0 of {dist.world_size})" if dist.enabled else ""),
        unit="img",
        dynamic_ncols=True,
    )
    last_save, unsaved = time.monotonic(), 0
    for batch in loader:
        good = [(index, item) for index, item, error in batch if error is None]
        errors = [(index, error) for index, _, error in batch if error is not None]
        if good:
            errors += process(good, sums)
        failures.extend({"index": i, "id": describe(i), "error": e} for i, e in sorted(errors))
        done += len(batch)
        unsaved += len(batch)
        bar.update(len(batch))
        if unsaved >= save_every or time.monotonic() - last_save > save_seconds:
            state.save(done, sums, failures)
            last_save, unsaved = time.monotonic(), 0
            if postfix is not None:
                bar.set_postfix_str(postfix(sums))
    state.save(done, sums, failures)
    bar.close()
    totals = {name: all_reduce_sum(value) for name, value in sums.items()}
    all_failures = sorted((f for part in gather_objects(failures) for f in part), key=lambda f: f["index"])
    return totals, all_failures


# --------------------------------------------------------------------------------------------
# Segmentation


@dataclass
class SegmentationReport:
    dataset: str
    num_images: int
    metrics: SegmentationMetrics
    failures: list[dict]
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "num_images": self.num_images,
            "num_failed": len(self.failures),
            "failures": self.failures,
            "protocol": self.protocol,
            **self.metrics.to_dict(),
        }


def evaluate_segmentation(
    segmenter: Segmenter,
    dataset: SegmentationDataset,
    *,
    names: Sequence[Sequence[str]] | None = None,
    templates: str | Sequence[str] | None = None,
    sliding_window: SlidingWindow | None = None,
    background_threshold: float | None = None,
    limit: int | None = None,
    dist: DistInfo | None = None,
    state_dir: str | os.PathLike | None = None,
    save_every: int = 20,
    workers: int = 0,
    progress: bool = True,
) -> SegmentationReport:
    """mIoU of ``segmenter`` on ``dataset`` (the whole split, or its first ``limit`` images).

    Args:
        names: per-class names to ask with (synonyms allowed); default ``dataset.prompt_names()``.
        templates: prompt templates (see ``Segmenter.predict``); default the dataset's own
            (``dataset.templates``), else CLIP's 80 ImageNet templates.
        sliding_window: the windowed protocol of the training-free papers, e.g.
            ``SlidingWindow(crop=224, stride=112, short_side=336)``; None: the whole image with its
            short side at the segmenter's ``image_size``.
        background_threshold: pixels whose winning probability is under it are predicted as the
            dataset's background class (only datasets that have one: voc21, context60).
        dist: this process's rank (``init_distributed()``); None: one process.
        state_dir: where partial sums are saved for resuming; None keeps nothing.
        workers: DataLoader processes decoding images ahead of the model.
    """
    dist = dist or DistInfo()
    templates = templates if templates is not None else (dataset.templates or "imagenet")
    queries = ClassQueries.from_names(names if names is not None else dataset.prompt_names())
    if queries.num_classes != dataset.num_classes:
        raise ValueError(f"{len(queries.names)} class names given for {dataset.num_classes} classes of {dataset.name}")
    if background_threshold is not None and dataset.background_index is None:
        raise ValueError(
            f"{dataset.name} has no background class, so background_threshold has nothing to predict; "
            "use it with a dataset that has one (voc21, context60)"
        )
    num_items = len(dataset) if limit is None else min(limit, len(dataset))
    protocol = {
        "model": segmenter.model_id,
        "split": getattr(dataset, "split", None),
        "root": str(getattr(dataset, "root", "")),
        "names": [list(n) for n in queries.names],
        "templates": list(templates) if not isinstance(templates, str) else templates,
        "sliding_window": None if sliding_window is None else asdict(sliding_window),
        "image_size": segmenter.image_size,
        "background_threshold": background_threshold,
        "limit": limit,
    }
    fingerprint = {"task": "segmentation", "dataset": dataset.name, **protocol}
    state = RunState(state_dir, fingerprint, dist)
    background = dataset.background_index if dataset.background_index is not None else -1
    segmenter.encode_labels(queries.queries, templates)  # once, before any image

    def process(batch: list[tuple[int, Any]], sums: dict[str, torch.Tensor]) -> list[tuple[int, str]]:
        errors = []
        for index, (image, mask) in batch:
            # One image per call: a prediction never depends on which images share its batch,
            # so any number of ranks gives the same pixels.
            result = segmenter.predict(
                [image],
                queries.queries,
                templates=templates,
                sliding_window=sliding_window,
                background_threshold=background_threshold,
                errors="return",
                keep_images=False,
            )[0]
            if isinstance(result, ImageError):
                errors.append((index, str(result.error)))
                continue
            prediction = queries.labels_to_classes(result.labels, none_class=background)
            sums["confusion"] += confusion_matrix(prediction, mask, dataset.num_classes, dataset.ignore_index)
        return errors

    def running_miou(sums: dict[str, torch.Tensor]) -> str:
        return f"mIoU {100 * SegmentationMetrics(dataset.classes, sums['confusion'].numpy()).miou:.2f} (this rank)"

    totals, failures = run_sharded(
        num_items,
        dataset.__getitem__,
        process,
        {"confusion": torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)},
        dist=dist,
        state=state,
        describe=dataset.sample_id,
        workers=workers,
        save_every=save_every,
        progress=progress,
        desc=dataset.name,
        postfix=running_miou,
    )
    metrics = SegmentationMetrics(tuple(dataset.classes), totals["confusion"].numpy())
    return SegmentationReport(dataset.name, num_items, metrics, failures, protocol)


# --------------------------------------------------------------------------------------------
# Zero-shot classification


@dataclass
class ClassificationReport:
    classes: tuple[str, ...]
    counts: dict[str, np.ndarray]  # "count" [C] and "{method}_top1" / "{method}_top5" [C] hits
    failures: list[dict]
    protocol: dict[str, Any]

    def accuracy(self, method: str, k: int) -> float:
        total = int(self.counts["count"].sum())
        return float(self.counts[f"{method}_top{k}"].sum() / total) if total else float("nan")

    def mean_per_class(self, method: str) -> float:
        count = self.counts["count"]
        present = count > 0
        return (
            float((self.counts[f"{method}_top1"][present] / count[present]).mean()) if present.any() else float("nan")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": int(self.counts["count"].sum()),
            "num_failed": len(self.failures),
            "failures": self.failures,
            "protocol": self.protocol,
            **{
                method: {
                    "top1": self.accuracy(method, 1),
                    "top5": self.accuracy(method, 5),
                    "mean_per_class_top1": self.mean_per_class(method),
                }
                for method in METHODS
            },
        }

    def table(self) -> str:
        lines = ["| method | top-1 | top-5 | mean per-class top-1 |", "|--------|------:|------:|------:|"]
        for method in METHODS:
            lines.append(
                f"| {method} | {100 * self.accuracy(method, 1):.2f} | {100 * self.accuracy(method, 5):.2f} | "
                f"{100 * self.mean_per_class(method):.2f} |"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _PreprocessedFolder:
    """``index -> (pixels [3, S, S], label)``; a class, not a closure, so DataLoader workers can pickle it."""

    folder: ImageFolder
    preprocess: Callable[[Any], torch.Tensor]

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder[index]
        return self.preprocess(path), label


def evaluate_classification(
    classifier: ZeroShotClassifier,
    folder: ImageFolder,
    *,
    templates: str | Sequence[str] = "imagenet",
    limit: int | None = None,
    dist: DistInfo | None = None,
    state_dir: str | os.PathLike | None = None,
    save_every: int = 256,
    workers: int = 0,
    progress: bool = True,
) -> ClassificationReport:
    """Top-1 / top-5 of PACL's compatibility and of plain CLIP on an ImageFolder, side by side."""
    dist = dist or DistInfo()
    classes = ClassQueries(folder.names)
    num_classes = classes.num_classes
    num_items = len(folder) if limit is None else min(limit, len(folder))
    protocol = {
        "model": classifier.segmenter.model_id,
        "root": str(folder.root),
        "names": [list(n) for n in classes.names],
        "templates": list(templates) if not isinstance(templates, str) else templates,
        "image_size": classifier.preprocess.size,
        "limit": limit,
    }
    fingerprint = {"task": "classification", **protocol}
    state = RunState(state_dir, fingerprint, dist)
    embeddings = classifier.encode_classes(classes, templates)
    k = min(5, num_classes)

    def process(batch: list[tuple[int, Any]], sums: dict[str, torch.Tensor]) -> list[tuple[int, str]]:
        pixels = torch.stack([pixels for _, (pixels, _) in batch])
        labels = torch.tensor([label for _, (_, label) in batch])
        scores = classifier.score(pixels, embeddings, classes)
        sums["count"] += torch.bincount(labels, minlength=num_classes)
        for method in METHODS:
            top = scores[method].cpu().topk(k, dim=-1).indices  # [B, k]
            hit1 = top[:, 0] == labels
            hit5 = (top == labels[:, None]).any(dim=-1)
            sums[f"{method}_top1"] += torch.bincount(labels[hit1], minlength=num_classes)
            sums[f"{method}_top5"] += torch.bincount(labels[hit5], minlength=num_classes)
        return []

    zeros = {"count": torch.zeros(num_classes, dtype=torch.int64)}
    for method in METHODS:
        for n in (1, 5):
            zeros[f"{method}_top{n}"] = torch.zeros(num_classes, dtype=torch.int64)
    totals, failures = run_sharded(
        num_items,
        _PreprocessedFolder(folder, classifier.preprocess),
        process,
        zeros,
        dist=dist,
        state=state,
        describe=folder.sample_id,
        batch_size=classifier.segmenter.batch_size,
        workers=workers,
        save_every=save_every,
        progress=progress,
        desc="classify",
    )
    names = tuple(n[0] for n in classes.names)
    return ClassificationReport(names, {k: v.numpy() for k, v in totals.items()}, failures, protocol)
