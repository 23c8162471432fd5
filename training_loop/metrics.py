"""Evaluation metrics, defined as the surgical benchmarks define them.

Segmentation: intersections and unions summed over the whole dataset, then per class (classes absent
from both prediction and ground truth are skipped), mIoU and mean Dice. Phase: accuracy and macro-F1.
CVS: average precision per criterion (ground truth thresholded at 0.5, as Endoscapes does), mAP and
balanced accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


# --- phase recognition, per video (Cholec80 evaluation) --------------------------------------------------
def relaxed_diff(
    pred: np.ndarray, gt: np.ndarray, fps: float, cholec80_rules: bool = True, window_s: float = 10.0
) -> np.ndarray:
    """``pred - gt`` with boundary errors forgiven as the Cholec80 MATLAB ``Evaluate.m`` does.

    Within the first ``window_s`` seconds of each ground-truth segment a prediction still in the previous
    phase (diff -1; -1/-2 for phases 6-7) counts as correct; within the last ``window_s`` seconds an early
    switch to the next phase (+1; +1/+2 for phases 4-7) does. Phase numbers are 1-based in that rule table.
    """
    diff = pred.astype(np.int64) - gt.astype(np.int64)
    out = diff.copy()
    t_orig = max(1, int(round(window_s * fps)))
    n = len(gt)
    start = 0
    while start < n:
        end = start
        while end + 1 < n and gt[end + 1] == gt[start]:
            end += 1
        phase1 = int(gt[start]) + 1
        cur = diff[start : end + 1].copy()
        t = min(t_orig, len(cur))
        head, tail = cur[:t], cur[len(cur) - t :]
        early = (-1, -2) if cholec80_rules and phase1 in (6, 7) else (-1,)
        late = (1, 2) if cholec80_rules and phase1 in (4, 5, 6, 7) else (1,)
        head[np.isin(head, early)] = 0
        tail[np.isin(tail, late)] = 0
        cur[:t], cur[len(cur) - t :] = head, tail
        out[start : end + 1] = cur
        start = end + 1
    return out


def phase_video_metrics(
    videos: list[tuple[np.ndarray, np.ndarray]],
    num_phases: int,
    relaxed: bool = False,
    fps: float = 1.0,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and Jaccard computed per video, then averaged (Cholec80 ``Main.m`` convention).

    ``videos`` is a list of (pred, gt) arrays in frame order; gt -1 = unlabelled (dropped). Jaccard per phase
    is nan-meaned over the videos where the phase occurs, then averaged over phases; accuracy and macro-F1
    are means over videos. ``relaxed`` applies the 10-second boundary relaxation of :func:`relaxed_diff`
    (Cholec80 phase-specific rules when there are 7 phases).
    """
    accs, f1s = [], []
    jacc = np.full((len(videos), num_phases), np.nan)
    for v, (pred, gt) in enumerate(videos):
        pred, gt = np.asarray(pred), np.asarray(gt)
        keep = gt >= 0
        pred, gt = pred[keep], gt[keep]
        if len(gt) == 0:
            continue
        diff = relaxed_diff(pred, gt, fps, cholec80_rules=num_phases == 7) if relaxed else pred - gt
        correct = diff == 0
        accs.append(float(correct.mean()))
        f1s.append(float(f1_score(gt, pred, labels=np.unique(gt), average="macro", zero_division=0)))
        for k in np.unique(gt):
            union = (gt == k) | (pred == k)
            jacc[v, k] = float(correct[union].sum() / union.sum())
    per_phase = [None if np.isnan(c).all() else float(np.nanmean(c)) for c in jacc.T]
    known = [p for p in per_phase if p is not None]
    return {
        "accuracy": float(np.mean(accs)) if accs else 0.0,
        "accuracy_std_videos": float(np.std(accs)) if accs else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "jaccard": float(np.mean(known)) if known else 0.0,
        "jaccard_std_phases": float(np.std(known)) if known else 0.0,
        "jaccard_per_phase": per_phase,
        "videos": len(accs),
        "relaxed": relaxed,
    }


# --- CVS ----------------------------------------------------------------------------------------------------
def calibrate_cvs_thresholds(probs: np.ndarray, target: np.ndarray) -> list[float]:
    """Per criterion, the threshold from linspace(0, 1, 10) with the best balanced accuracy (on validation).

    As the Endoscapes evaluator does; the thresholds are then applied to the test predictions.
    """
    probs, target = np.asarray(probs, float), np.asarray(target, float)
    out = []
    for j in range(target.shape[1]):
        known = ~np.isnan(target[:, j])
        y = np.round(target[known, j]) >= 1
        if known.sum() == 0 or y.all() or (~y).all():
            out.append(0.5)
            continue
        scores = [
            (balanced_accuracy_score(y, probs[known, j] >= t), -abs(t - 0.5), t)
            for t in np.linspace(0, 1, 10)
        ]
        out.append(float(max(scores)[2]))
    return out


def cvs_metrics_thresholded(
    probs: np.ndarray, target: np.ndarray, keys: list[str], thresholds: list[float] | None = None
) -> dict[str, Any]:
    """Endoscapes CVS metrics: ground truth = rounded rater mean; AP per criterion, mAP, balanced accuracy.

    ``thresholds`` (e.g. from :func:`calibrate_cvs_thresholds` on validation) default to 0.5.
    """
    probs, target = np.asarray(probs, float), np.asarray(target, float)
    thresholds = thresholds or [0.5] * len(keys)
    ap, bacc = {}, {}
    for j, key in enumerate(keys):
        known = ~np.isnan(target[:, j])
        y = np.round(target[known, j]) >= 1
        if known.sum() == 0 or y.all() or (~y).all():
            continue
        ap[key] = float(average_precision_score(y, probs[known, j]))
        bacc[key] = float(balanced_accuracy_score(y, probs[known, j] >= thresholds[j]))
    return {
        "mAP": float(np.mean(list(ap.values()))) if ap else 0.0,
        "balanced_accuracy": float(np.mean(list(bacc.values()))) if bacc else 0.0,
        "ap_per_criterion": ap,
        "balanced_accuracy_per_criterion": bacc,
        "thresholds": dict(zip(keys, map(float, thresholds), strict=True)),
    }


def mask_dice(a: np.ndarray, b: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean Dice over the classes present in either mask (1.0 when both are empty or identical)."""
    valid = (a != ignore_index) & (b != ignore_index)
    a, b = a[valid], b[valid]
    scores = []
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c >= num_classes:
            continue
        pa, pb = a == c, b == c
        scores.append(2 * (pa & pb).sum() / max(1, pa.sum() + pb.sum()))
    return float(np.mean(scores)) if scores else 1.0
