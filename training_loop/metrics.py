"""Evaluation metrics, defined as the surgical benchmarks define them.

Segmentation: intersections and unions summed over the whole dataset, then per class (classes absent
from both prediction and ground truth are skipped), mIoU and mean Dice. Phase: accuracy and macro-F1.
CVS: average precision per criterion (ground truth thresholded at 0.5, as Endoscapes does), mAP and
balanced accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score

from surgenet_assist.core.schema import IGNORE_INDEX


@dataclass
class SegmentationAccumulator:
    """Accumulates a confusion matrix frame by frame (bounded memory for any dataset size)."""

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    confusion: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        valid = target != self.ignore_index
        t = target[valid].astype(np.int64)
        p = np.clip(pred[valid].astype(np.int64), 0, self.num_classes - 1)
        self.confusion += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def result(self) -> dict[str, float | list[float | None]]:
        inter = np.diag(self.confusion).astype(float)
        gt = self.confusion.sum(1).astype(float)
        pr = self.confusion.sum(0).astype(float)
        union = gt + pr - inter
        present = union > 0
        iou = np.where(present, inter / np.maximum(union, 1), np.nan)
        dice = np.where(present, 2 * inter / np.maximum(gt + pr, 1), np.nan)
        return {
            "mIoU": float(np.nanmean(iou)) if present.any() else 0.0,
            "mDice": float(np.nanmean(dice)) if present.any() else 0.0,
            "pixel_accuracy": float(inter.sum() / max(1.0, gt.sum())),
            "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
            "dice_per_class": [None if np.isnan(v) else float(v) for v in dice],
        }


def phase_metrics(pred: np.ndarray, target: np.ndarray, num_phases: int) -> dict[str, float]:
    pred, target = np.asarray(pred), np.asarray(target)
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    if len(target) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    present = np.unique(target)
    return {
        "accuracy": float((pred == target).mean()),
        "macro_f1": float(f1_score(target, pred, labels=present, average="macro", zero_division=0)),
    }


def cvs_metrics(probs: np.ndarray, target: np.ndarray, keys: list[str]) -> dict[str, float | dict]:
    """AP per criterion (targets >= 0.5 are positive; NaN targets skipped), mAP and balanced accuracy."""
    probs, target = np.asarray(probs, float), np.asarray(target, float)
    ap, bacc = {}, {}
    for j, key in enumerate(keys):
        known = ~np.isnan(target[:, j])
        y = target[known, j] >= 0.5
        if known.sum() == 0 or y.all() or (~y).all():
            continue  # AP undefined without both classes
        ap[key] = float(average_precision_score(y, probs[known, j]))
        bacc[key] = float(balanced_accuracy_score(y, probs[known, j] >= 0.5))
    return {
        "mAP": float(np.mean(list(ap.values()))) if ap else 0.0,
        "balanced_accuracy": float(np.mean(list(bacc.values()))) if bacc else 0.0,
        "ap_per_criterion": ap,
    }
