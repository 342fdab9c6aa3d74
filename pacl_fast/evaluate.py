"""Evaluation loops: segmentation mIoU on the benchmark layouts, zero-shot classification top-1/top-5.

The metrics are in :mod:`pacl_fast.metrics`; running, resuming and sharing the work across
``torchrun`` ranks is :mod:`pacl_fast.runs` (each rank a strided share of the images, integer sums
all-reduced at the end, so the numbers are exactly those of one process; with a state directory a
killed run started again with the same settings skips what it had done and ends with identical
numbers). What is here: what each task asks the model, and what it adds up.

A run's fingerprint holds every setting the numbers depend on, the dataset's length and a hash
of its sample ids, so a resumed run never mixes images of an old split list with a new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pacl_fast.data.classification import ImageFolder
from pacl_fast.data.names import ClassQueries
from pacl_fast.data.segmentation import SegmentationDataset
from pacl_fast.distributed import DistInfo
from pacl_fast.images import Prepared, SegmentationPreprocess, SlidingWindow, require_opencv
from pacl_fast.metrics import SegmentationMetrics, confusion_matrix
from pacl_fast.protocols import EvalProtocol
from pacl_fast.runs import RunState, run_sharded, sample_ids_digest
from pacl_fast.segmenter import Segmenter
from pacl_fast.zeroshot import METHODS, ZeroShotClassifier


def _samples(length: int, sample_id: Callable[[int], str]) -> dict[str, Any]:
    """The fingerprint entries that pin which images a run is over."""
    return {"num_samples": length, "sample_ids_sha256": sample_ids_digest(sample_id(i) for i in range(length))}


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


@dataclass(frozen=True)
class _PreparedSamples:
    """``index -> (Prepared, mask)``: decoding and preprocessing in DataLoader workers (picklable)."""

    dataset: SegmentationDataset
    preprocess: SegmentationPreprocess

    def __call__(self, index: int) -> tuple[Prepared, np.ndarray]:
        image, mask = self.dataset[index]
        return self.preprocess(image), mask


def _query_embeddings(segmenter: Segmenter, queries: Sequence[str], templates: str | Sequence[str]) -> torch.Tensor:
    """``[Q, E]`` for every query in order; a query asked twice (a protocol's name files repeat some,
    e.g. "bed" in COCO-Object) is embedded once and shares its row, so ties go to the first."""
    unique = list(dict.fromkeys(queries))
    rows = torch.tensor([unique.index(query) for query in queries])
    return segmenter.encode_labels(unique, templates)[rows]


def evaluate_segmentation(
    segmenter: Segmenter,
    dataset: SegmentationDataset,
    *,
    names: Sequence[Sequence[str]] | None = None,
    templates: str | Sequence[str] | None = None,
    sliding_window: SlidingWindow | None = None,
    background_threshold: float | None = None,
    protocol: EvalProtocol | None = None,
    limit: int | None = None,
    dist: DistInfo | None = None,
    state_dir: str | os.PathLike | None = None,
    save_every: int = 20,
    workers: int = 0,
    progress: bool = True,
) -> SegmentationReport:
    """mIoU of ``segmenter`` on ``dataset`` (the whole split, or its first ``limit`` images).

    Images are decoded and prepared in DataLoader workers and go through the model
    ``segmenter.batch_size`` at a time (``Segmenter.segment_prepared``: images of one canvas size
    share an encoder batch).

    Args:
        names: per-class names to ask with (synonyms allowed); default ``dataset.prompt_names()``.
        templates: prompt templates (see ``Segmenter.predict``); default the dataset's own
            (``dataset.templates``), else the model's (``Segmenter.defaults``).
        sliding_window: the windowed protocol of the training-free papers, e.g.
            ``SlidingWindow(crop=224, stride=112, short_side=336)``; None: the whole image with its
            short side at the segmenter's ``image_size``.
        background_threshold: pixels whose winning probability is under it are predicted as the
            dataset's background class (only datasets that have one: voc21, context60, cocoobject).
        protocol: a training-free paper's preset (``pacl_fast.protocols.get_protocol``); it sets the
            names, templates, window and thresholds (so those must be left out), the resize (mmcv's,
            ``EvalProtocol.preprocessor``) and PAMR's guide (``EvalProtocol.pamr_guide``), and the
            segmenter must be built with its short side and logit scale (``pacl-fast eval --protocol``
            does). Protocols with PAMR or an area threshold post-process image-size logits
            (``Segmenter.image_logits``), which costs ``4 * Q * H * W`` bytes an image.
        dist: this process's rank (``init_distributed()``); None: one process.
        state_dir: where partial sums are saved for resuming; None keeps nothing.
        workers: DataLoader processes decoding images ahead of the model.
    """
    dist = dist or DistInfo()
    plan = _segmentation_plan(segmenter, dataset, names, templates, sliding_window, background_threshold, protocol)
    num_items = len(dataset) if limit is None else min(limit, len(dataset))
    settings = _segmentation_settings(segmenter, dataset, plan, protocol, limit)
    fingerprint = {
        "task": "segmentation",
        "dataset": dataset.name,
        **settings,
        **_samples(len(dataset), dataset.sample_id),  # pins the images
    }
    state = RunState(state_dir, fingerprint, dist)
    predictor = _SegmentationPredictor.build(segmenter, dataset, plan, protocol)
    if protocol is not None:
        preprocess = protocol.preprocessor(
            segmenter.pixel_multiple, segmenter.mean, segmenter.std, segmenter.max_pixels, segmenter.grid_patch
        )
    else:
        preprocess = segmenter.preprocessor(plan.sliding_window)

    def running_miou(sums: dict[str, torch.Tensor]) -> str:
        return f"mIoU {100 * SegmentationMetrics(dataset.classes, sums['confusion'].numpy()).miou:.2f} (this rank)"

    totals, failures = run_sharded(
        num_items,
        _PreparedSamples(dataset, preprocess),
        predictor.process,
        {"confusion": torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)},
        dist=dist,
        state=state,
        describe=dataset.sample_id,
        batch_size=segmenter.batch_size,
        workers=workers,
        save_every=save_every,
        progress=progress,
        desc=dataset.name,
        postfix=running_miou,
    )
    metrics = SegmentationMetrics(tuple(dataset.classes), totals["confusion"].numpy())
    return SegmentationReport(dataset.name, num_items, metrics, failures, settings)


@dataclass(frozen=True)
class _SegmentationPlan:
    """What a segmentation run asks the model, resolved from a protocol or from the caller's options."""

    queries: tuple[str, ...]  # every name asked, in order (a class may have several)
    query_class: tuple[int, ...]  # query index -> class index
    names: list  # the names as the run's settings record them
    templates: str | Sequence[str]
    sliding_window: SlidingWindow | None
    background_threshold: float | None
    dense: bool  # post-processing on image-size logits (a protocol's PAMR or area threshold)


def _segmentation_plan(
    segmenter: Segmenter,
    dataset: SegmentationDataset,
    names: Sequence[Sequence[str]] | None,
    templates: str | Sequence[str] | None,
    sliding_window: SlidingWindow | None,
    background_threshold: float | None,
    protocol: EvalProtocol | None,
) -> _SegmentationPlan:
    """The queries, templates, window and threshold of a run, checked before any image is read."""
    dense = False
    if protocol is not None:
        _check_protocol(protocol, segmenter, dataset, names, templates, sliding_window, background_threshold)
        require_opencv()  # before any image: the protocols resize with OpenCV
        queries, query_class = protocol.queries, protocol.query_class
        recorded_names = list(queries)
        templates = protocol.templates
        if not protocol.whole_image:
            sliding_window = SlidingWindow(protocol.slide_crop, protocol.slide_stride, protocol.short_side)
        background_threshold = protocol.prob_threshold or None
        dense = protocol.pamr is not None or protocol.area_threshold is not None
    else:
        asked = ClassQueries.from_names(names if names is not None else dataset.prompt_names())
        if asked.num_classes != dataset.num_classes:
            raise ValueError(
                f"{len(asked.names)} class names given for {dataset.num_classes} classes of {dataset.name}"
            )
        queries, query_class = asked.queries, asked.query_class
        recorded_names = [list(n) for n in asked.names]
        templates = templates if templates is not None else (dataset.templates or segmenter.defaults.templates)
    segmenter.check_options(sliding_window, background_threshold)
    if background_threshold is not None and dataset.background_index is None:
        raise ValueError(
            f"{dataset.name} has no background class, so background_threshold has nothing to predict; "
            "use it with a dataset that has one (voc21, context60, cocoobject)"
        )
    return _SegmentationPlan(
        queries, query_class, recorded_names, templates, sliding_window, background_threshold, dense
    )


def _segmentation_settings(
    segmenter: Segmenter,
    dataset: SegmentationDataset,
    plan: _SegmentationPlan,
    protocol: EvalProtocol | None,
    limit: int | None,
) -> dict[str, Any]:
    """Every setting the numbers depend on: the report's record and (with the samples) the run's fingerprint."""
    templates = plan.templates
    return {
        "model": segmenter.model_id,
        "split": getattr(dataset, "split", None),
        "root": str(getattr(dataset, "root", "")),
        "names": plan.names,
        "templates": list(templates) if not isinstance(templates, str) else templates,
        "sliding_window": None if plan.sliding_window is None else asdict(plan.sliding_window),
        "image_size": segmenter.image_size,
        "logit_scale": segmenter.logit_scale,
        "background_threshold": plan.background_threshold,
        "eval_protocol": None if protocol is None else protocol.to_dict(),
        "limit": limit,
    }


@dataclass(frozen=True)
class _SegmentationPredictor:
    """One batch of prepared images -> confusion counts added to the run's sums; an image fails alone."""

    segmenter: Segmenter
    dataset: SegmentationDataset
    plan: _SegmentationPlan
    protocol: EvalProtocol | None
    embeddings: torch.Tensor  # [Q, E]
    to_class: np.ndarray  # [Q + 1] query label -> class; the last entry (-1) -> background or ignored

    @classmethod
    def build(
        cls,
        segmenter: Segmenter,
        dataset: SegmentationDataset,
        plan: _SegmentationPlan,
        protocol: EvalProtocol | None,
    ) -> _SegmentationPredictor:
        background = dataset.background_index if dataset.background_index is not None else -1
        to_class = np.append(np.asarray(plan.query_class, dtype=np.int64), background)  # query label -> class
        embeddings = _query_embeddings(segmenter, plan.queries, plan.templates)  # once, before any image
        return cls(segmenter, dataset, plan, protocol, embeddings, to_class)

    def predict(self, batch: list[tuple[int, Any]]) -> list[np.ndarray | Exception]:
        """Class labels ``[H, W]`` per image, or the error that stopped it."""
        plan, segmenter = self.plan, self.segmenter
        if not plan.dense:
            masks = segmenter.segment_prepared(
                [prepared for _, (prepared, _) in batch],
                self.embeddings,
                sliding_window=plan.sliding_window,
                background_threshold=plan.background_threshold,
                with_scores=plan.background_threshold is not None,
            )
            return [m if isinstance(m, Exception) else self.to_class[m[0].numpy().astype(np.int64)] for m in masks]
        protocol = self.protocol
        outcomes = []
        for _, (prepared, _) in batch:
            try:
                logits = segmenter.image_logits(prepared, self.embeddings, plan.sliding_window)  # [Q, H, W]
                guide = None
                if protocol.pamr is not None:  # NACLIP's: the network input resized back to the image
                    guide = protocol.pamr_guide(prepared.pixels.to(logits.device), prepared.geometry)
                outcomes.append(protocol.postprocess(logits, guide).cpu().numpy())
            except (ValueError, RuntimeError) as error:
                outcomes.append(error)
        return outcomes

    def process(self, batch: list[tuple[int, Any]], sums: dict[str, torch.Tensor]) -> list[tuple[int, str]]:
        dataset = self.dataset
        errors = []
        for (index, (_, mask)), prediction in zip(batch, self.predict(batch)):
            try:  # this image fails alone
                if isinstance(prediction, Exception):
                    raise prediction
                counts = confusion_matrix(prediction, mask, dataset.num_classes, dataset.ignore_index)
            except Exception as error:
                errors.append((index, f"{type(error).__name__}: {error}"))
                continue
            sums["confusion"] += counts
        return errors


def _check_protocol(
    protocol: EvalProtocol,
    segmenter: Segmenter,
    dataset: SegmentationDataset,
    *overrides: object,
) -> None:
    """A protocol fixes the evaluation: refuse settings that would contradict it, naming them."""
    if protocol.dataset != dataset.name:
        raise ValueError(f"protocol {protocol.name} preset is for {protocol.dataset}, the dataset is {dataset.name}")
    if any(value is not None for value in overrides):
        raise ValueError("a protocol sets the class names, templates, sliding window and threshold: leave them out")
    if segmenter.image_size != protocol.short_side or segmenter.logit_scale != protocol.logit_scale:
        raise ValueError(
            f"protocol {protocol.name} on {dataset.name} runs at short side {protocol.short_side} and logit scale "
            f"{protocol.logit_scale}; build the segmenter with image_size={protocol.short_side}, "
            f"logit_scale={protocol.logit_scale} (got {segmenter.image_size}, {segmenter.logit_scale})"
        )


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


def _classification_invariants(sums: dict[str, torch.Tensor], done: int, failures: list[dict]) -> str | None:
    """What every saved classification state satisfies: each done image counted once or failed, hits <= count."""
    counted = int(sums["count"].sum())
    if counted + len(failures) != done:
        return f"{counted} images counted and {len(failures)} failed, but done={done}"
    for method in METHODS:
        top1, top5 = sums[f"{method}_top1"], sums[f"{method}_top5"]
        if (top1 > top5).any() or (top5 > sums["count"]).any():
            return f"{method} hits exceed the images counted (top-1 <= top-5 <= count per class)"
    return None


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
    fingerprint = {"task": "classification", **protocol, **_samples(len(folder), folder.sample_id)}
    state = RunState(state_dir, fingerprint, dist)
    embeddings = classifier.encode_classes(classes, templates)
    k = min(5, num_classes)

    def process(batch: list[tuple[int, Any]], sums: dict[str, torch.Tensor]) -> list[tuple[int, str]]:
        pixels = torch.stack([pixels for _, (pixels, _) in batch])
        labels = torch.tensor([label for _, (_, label) in batch])
        try:
            scores = classifier.score(pixels, embeddings, classes)
        except Exception as error:  # the batch fails, the run goes on
            return [(index, f"{type(error).__name__}: {error}") for index, _ in batch]
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
        check=_classification_invariants,
        batch_size=classifier.segmenter.batch_size,
        workers=workers,
        save_every=save_every,
        progress=progress,
        desc="classify",
    )
    names = tuple(n[0] for n in classes.names)
    return ClassificationReport(names, {k: v.numpy() for k, v in totals.items()}, failures, protocol)
