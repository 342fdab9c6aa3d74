"""Segmentation metrics, as mmsegmentation computes them.

A confusion matrix over the pixels whose ground truth is not the ignore index (bincount of
``C * truth + prediction``); per class ``IoU = TP / (truth + predicted - TP)`` and
``Acc = TP / truth``; mIoU and mAcc average the classes that are defined (a class absent from
both truth and prediction has no IoU); aAcc is all true positives over all scored pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


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
