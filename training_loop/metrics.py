"""Evaluation metrics, defined as the surgical benchmarks define them.

Segmentation (mmsegmentation convention): intersections and unions summed over the whole dataset, then IoU
and Dice per class (classes absent from both prediction and ground truth are skipped), mIoU and mDice over
the classes present; optionally ASSD per class (average symmetric surface distance in pixels, per image then
averaged over the images where the class is in both prediction and ground truth).

Phase (Cholec80 ``Evaluate.m`` / ``Main.m``): accuracy per video; Jaccard, precision, recall and F1 per video
and phase, nan-meaned per phase over the videos whose ground truth has the phase, then averaged over
phases. The relaxed variant scores every one of these with the 10-second relaxed-boundary correctness; the
Cholec80 phase-specific rules are selected by the dataset's ``phase_protocol``, never by the phase count.
``matlab_compat`` reproduces the published scripts' behaviour (an indexing bug included) instead of their
intent, for comparison with published Cholec80 numbers.

CVS (Endoscapes): ground truth binarised by ONE rule everywhere (:func:`cvs_positive`: rater mean >= 0.5);
average precision per criterion, mAP and balanced accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score

from surgenet_assist.core.schema import IGNORE_INDEX, PHASE_PROTOCOLS


@dataclass
class SegmentationAccumulator:
    """Accumulates a confusion matrix frame by frame (bounded memory for any dataset size).

    With ``surface_distance=True`` it also accumulates ASSD per class (see :func:`assd`): per image, for each
    class present in both prediction and ground truth; images where a class is in exactly one of them have no
    finite surface distance and are counted in ``assd_undefined_per_class`` instead of being averaged in.
    """

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    surface_distance: bool = False
    confusion: np.ndarray = field(init=False)
    assd_sum: np.ndarray = field(init=False)
    assd_images: np.ndarray = field(init=False)
    assd_undefined: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.assd_sum = np.zeros(self.num_classes, dtype=np.float64)
        self.assd_images = np.zeros(self.num_classes, dtype=np.int64)
        self.assd_undefined = np.zeros(self.num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        valid = target != self.ignore_index
        t = target[valid].astype(np.int64)
        p = np.clip(pred[valid].astype(np.int64), 0, self.num_classes - 1)
        self.confusion += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )
        if self.surface_distance:
            self._update_surface(np.asarray(pred), np.asarray(target), valid)

    def _update_surface(self, pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> None:
        in_gt = set(np.unique(target[valid]).tolist())
        in_pred = set(np.unique(pred[valid]).tolist())
        for c in sorted(in_gt | in_pred):
            if not 0 <= c < self.num_classes:
                continue
            if c not in in_gt or c not in in_pred:
                self.assd_undefined[c] += 1
                continue
            self.assd_sum[c] += assd((pred == c) & valid, (target == c) & valid)
            self.assd_images[c] += 1

    def result(self) -> dict[str, Any]:
        inter = np.diag(self.confusion).astype(float)
        gt = self.confusion.sum(1).astype(float)
        pr = self.confusion.sum(0).astype(float)
        union = gt + pr - inter
        present = union > 0
        iou = np.where(present, inter / np.maximum(union, 1), np.nan)
        dice = np.where(present, 2 * inter / np.maximum(gt + pr, 1), np.nan)
        out: dict[str, Any] = {
            "mIoU": float(np.nanmean(iou)) if present.any() else 0.0,
            "mDice": float(np.nanmean(dice)) if present.any() else 0.0,
            "pixel_accuracy": float(inter.sum() / max(1.0, gt.sum())),
            "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
            "dice_per_class": [None if np.isnan(v) else float(v) for v in dice],
        }
        if self.surface_distance:
            per_class = [
                float(s / n) if n else None for s, n in zip(self.assd_sum, self.assd_images, strict=True)
            ]
            known = [v for v in per_class if v is not None]
            out["mASSD"] = float(np.mean(known)) if known else None
            out["assd_per_class"] = per_class
            out["assd_undefined_per_class"] = [int(v) for v in self.assd_undefined]
        return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (pixels on the image border count as surface)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def assd(a: np.ndarray, b: np.ndarray) -> float:
    """Average symmetric surface distance between two binary masks, in pixels (Euclidean).

    ASSD = (sum over surface pixels of ``a`` of the distance to the nearest surface pixel of ``b`` + the same
    from ``b`` to ``a``) / (number of surface pixels of ``a`` + of ``b``) (Heimann et al. 2009; MONAI's
    symmetric ``compute_average_surface_distance``). Surface = pixels with a 4-neighbour outside the mask.
    Both masks empty: 0.0; exactly one empty: ``inf`` (undefined; :class:`SegmentationAccumulator` counts such
    images apart instead of averaging them in). Computed on the bounding box of both masks plus a one-pixel
    margin, which gives the same distances as the full image.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    rows, cols = np.nonzero(a | b)
    r0, r1 = max(0, rows.min() - 1), min(a.shape[0], rows.max() + 2)
    c0, c1 = max(0, cols.min() - 1), min(a.shape[1], cols.max() + 2)
    # the margin holds no mask pixel, so erosion and distances inside the crop equal the full image's
    sa, sb = _surface(a[r0:r1, c0:c1]), _surface(b[r0:r1, c0:c1])
    to_b = ndimage.distance_transform_edt(~sb)
    to_a = ndimage.distance_transform_edt(~sa)
    return float((to_b[sa].sum() + to_a[sb].sum()) / (sa.sum() + sb.sum()))


def phase_metrics(pred: np.ndarray, target: np.ndarray, num_phases: int) -> dict[str, float]:
    """Frame-level accuracy and macro-F1 over all frames pooled (not the Cholec80 protocol)."""
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


# --- CVS ----------------------------------------------------------------------------------------------------
def cvs_positive(target: np.ndarray) -> np.ndarray:
    """THE binarisation of CVS ground truth, used everywhere: rater mean >= 0.5 is positive (NaN -> False).

    With three raters (means 0, 1/3, 2/3, 1) this equals the Endoscapes evaluator's rounding; at exactly 0.5
    (two raters, soft labels) it counts the criterion as achieved, where ``np.round`` (half to even) does not.
    """
    return np.asarray(target, dtype=float) >= 0.5


def cvs_metrics(probs: np.ndarray, target: np.ndarray, keys: list[str]) -> dict[str, float | dict]:
    """AP per criterion (ground truth by :func:`cvs_positive`, NaN skipped), mAP, balanced accuracy at 0.5."""
    out = cvs_metrics_thresholded(probs, target, keys)
    return {k: out[k] for k in ("mAP", "balanced_accuracy", "ap_per_criterion")}


def calibrate_cvs_thresholds(probs: np.ndarray, target: np.ndarray) -> list[float]:
    """Per criterion, the threshold from linspace(0, 1, 10) with the best balanced accuracy (on validation).

    As the Endoscapes evaluator does (ties: the threshold closest to 0.5); the thresholds are then applied to
    the test predictions. Ground truth binarised by :func:`cvs_positive`.
    """
    probs, target = np.asarray(probs, float), np.asarray(target, float)
    out = []
    for j in range(target.shape[1]):
        known = ~np.isnan(target[:, j])
        y = cvs_positive(target[known, j])
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
    """Endoscapes CVS metrics: AP per criterion, mAP, balanced accuracy (per criterion and mean).

    Ground truth = :func:`cvs_positive` of the rater mean; NaN targets skipped; a criterion whose known
    ground truth has a single class has no AP and is left out. AP is the step-wise (non-interpolated) area
    ``sum_n (R_n - R_{n-1}) P_n``. ``thresholds`` (e.g. from :func:`calibrate_cvs_thresholds` on validation)
    default to 0.5; a prediction ``>=`` its threshold is positive.
    """
    probs, target = np.asarray(probs, float), np.asarray(target, float)
    thresholds = thresholds or [0.5] * len(keys)
    ap, bacc = {}, {}
    for j, key in enumerate(keys):
        known = ~np.isnan(target[:, j])
        y = cvs_positive(target[known, j])
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


# --- phase recognition, per video (Cholec80 evaluation) --------------------------------------------------
def relaxed_diff(
    pred: np.ndarray,
    gt: np.ndarray,
    fps: float,
    cholec80_rules: bool = True,
    window_s: float = 10.0,
    *,
    matlab_compat: bool = False,
) -> np.ndarray:
    """``pred - gt`` with boundary errors forgiven as the Cholec80 MATLAB ``Evaluate.m`` intends.

    ``fps`` is the rate of the rows (frames per second of the sequence scored), so the window is
    ``t = window_s * fps`` rows: 10 rows at 1 fps, 50 at 5 fps. Per ground-truth segment (run of one phase):
    within its first ``t`` rows (``t`` cut to the segment length) a prediction still in the previous phase
    (diff -1) counts as correct; within its last ``t`` rows an early switch to the next phase (+1) does.
    ``cholec80_rules`` adds Cholec80's phase-specific rules (1-based phases 4-5: +2 also forgiven at the end;
    6-7: -2 at the start and +2 at the end).

    ``matlab_compat`` reproduces the published script instead of its intent. ``Evaluate.m`` writes the end
    rule as ``curDiff(curDiff(end-t+1:end)==1) = 0``: the logical index is computed on the segment's last
    ``t`` rows but, being ``t`` long, addresses its FIRST ``t`` rows. So an early transition at the end of a
    segment is never forgiven, and row ``i`` of the segment's head is zeroed (whatever its error) when row
    ``i`` of its tail is an early transition. Published Cholec80 numbers were computed that way.
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
        early = (-1, -2) if cholec80_rules and phase1 in (6, 7) else (-1,)
        late = (1, 2) if cholec80_rules and phase1 in (4, 5, 6, 7) else (1,)
        # in the script's order: the head rule first, then the end rule on the updated segment
        cur[:t][np.isin(cur[:t], early)] = 0
        tail_ok = np.isin(cur[len(cur) - t :], late)
        if matlab_compat:
            cur[:t][tail_ok] = 0
        else:
            cur[len(cur) - t :][tail_ok] = 0
        out[start : end + 1] = cur
        start = end + 1
    return out


def _phase_protocol_rules(protocol: str | None) -> bool:
    if protocol not in PHASE_PROTOCOLS:
        raise ValueError(f"unknown phase protocol {protocol!r}; known: {PHASE_PROTOCOLS}")
    return protocol == "cholec80"


def phase_video_scores(
    pred: np.ndarray, gt: np.ndarray, num_phases: int, correct: np.ndarray, *, matlab_compat: bool = False
) -> dict[str, np.ndarray | float]:
    """One video's scores as ``Evaluate.m`` computes them, from a per-frame ``correct`` mask.

    Per phase k whose ground truth occurs in the video (NaN otherwise): U = frames predicted k or labelled k,
    TP = frames of U that are ``correct``; Jaccard = TP/|U|, precision = TP/#predicted k, recall =
    TP/#labelled k, each clipped to 1 (relaxed TP can exceed the denominators, ``Main.m`` clips at 100 %);
    F1 = 2PR/(P+R). A phase that is labelled but never predicted gets precision 0 and F1 0 (``Evaluate.m``
    divides by zero: ``matlab_compat`` keeps its answer, NaN when TP is 0 and 1 (infinity clipped) when the
    relaxation made some of its frames correct). Accuracy = mean of ``correct``. With ``correct = pred ==
    gt`` these are the strict per-class scores (precision/recall/F1 as scikit-learn's, ``zero_division=0``).
    """
    shape = (num_phases,)
    jac, prec, rec, f1 = (np.full(shape, np.nan) for _ in range(4))
    for k in range(num_phases):
        is_gt, is_pred = gt == k, pred == k
        n_gt, n_pred = int(is_gt.sum()), int(is_pred.sum())
        if n_gt == 0:
            continue
        union = is_gt | is_pred
        tp = float(correct[union].sum())
        jac[k] = min(1.0, tp / union.sum())
        if n_pred:
            prec[k] = min(1.0, tp / n_pred)
        elif matlab_compat:
            prec[k] = 1.0 if tp > 0 else np.nan
        else:
            prec[k] = 0.0
        rec[k] = min(1.0, tp / n_gt)
        if not np.isnan(prec[k]):
            f1[k] = 2 * prec[k] * rec[k] / (prec[k] + rec[k]) if prec[k] + rec[k] > 0 else 0.0
    return {
        "accuracy": float(correct.mean()),
        "jaccard": jac,
        "precision": prec,
        "recall": rec,
        "f1": f1,
    }


def _matlab_std(values: np.ndarray) -> float:
    """MATLAB's ``std``: the N-1 normalisation, and 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _per_phase_then_mean(
    rows: list[np.ndarray], num_phases: int, matlab: str | None = None
) -> tuple[list[float | None], float, float]:
    """``Main.m``: nan-mean each phase over videos, then mean (and std) over the phases with a value.

    ``matlab`` reproduces the script's own reductions over phases instead: ``"mean"`` (Jaccard, recall:
    ``mean``/``std``, so a phase absent from every video makes the result NaN) or ``"nanmean"`` (precision:
    ``nanmean``/``nanstd``), both with MATLAB's N-1 standard deviation."""
    table = np.vstack(rows) if rows else np.full((0, num_phases), np.nan)
    per_phase = [None if np.isnan(c).all() else float(np.nanmean(c)) for c in table.T]
    known = [p for p in per_phase if p is not None]
    if matlab == "mean":
        values = np.array([np.nan if p is None else p for p in per_phase])
        return per_phase, float(np.mean(values)), _matlab_std(values)  # NaN propagates, as in MATLAB
    if matlab == "nanmean":
        return per_phase, (float(np.mean(known)) if known else np.nan), _matlab_std(np.array(known))
    return per_phase, (float(np.mean(known)) if known else 0.0), (float(np.std(known)) if known else 0.0)


def phase_video_metrics(
    videos: list[tuple[np.ndarray, np.ndarray]],
    num_phases: int,
    relaxed: bool = False,
    fps: float | list[float] = 1.0,
    *,
    protocol: str | None = None,
    window_s: float = 10.0,
    matlab_compat: bool = False,
) -> dict[str, Any]:
    """Phase metrics per video, then averaged as the Cholec80 ``Main.m`` does.

    ``videos`` is a list of (pred, gt) arrays in frame order; gt -1 = unlabelled (dropped). Per video see
    :func:`phase_video_scores`. Aggregation: accuracy = mean (and std) over videos; Jaccard, precision,
    recall and F1 = per phase nan-mean over the videos where the phase occurs, then mean over phases (the
    ``_std_phases`` values are the std across phases, as ``Main.m`` reports "±"). ``macro_f1`` is the other
    common aggregation: per video the mean F1 over the phases it contains, then the mean over videos.

    ``relaxed`` scores every metric (accuracy, Jaccard, precision, recall, F1) with the relaxed-boundary
    correctness of :func:`relaxed_diff` (``window_s`` seconds at ``fps`` rows per second; one rate for all
    videos or one per video); ``protocol`` selects the dataset's rules: ``"cholec80"`` adds Cholec80's
    phase-specific rules, None (any other dataset, e.g. AutoLaparo, also 7 phases) uses the general rule
    only. Pass ``LabelSchema.phase_protocol``.

    ``matlab_compat`` (relaxed, Cholec80 only) reproduces the published ``Evaluate.m`` + ``Main.m`` rather
    than their intent, so the numbers compare with published Cholec80 results: the end-of-segment rule's
    indexing (:func:`relaxed_diff`), precision of a never-predicted phase as the script's division by zero
    gives it, Jaccard and recall averaged over phases with ``mean`` (NaN when a phase is absent from every
    video) and precision with ``nanmean``, MATLAB's N-1 standard deviations, and no F1 (the script has none).
    """
    cholec80_rules = _phase_protocol_rules(protocol)
    if matlab_compat and not (relaxed and cholec80_rules):
        raise ValueError(
            "matlab_compat reproduces the Cholec80 relaxed script: pass relaxed=True and protocol='cholec80'"
        )
    rates = list(fps) if isinstance(fps, list | tuple | np.ndarray) else [float(fps)] * len(videos)
    if len(rates) != len(videos):
        raise ValueError(f"{len(rates)} frame rates for {len(videos)} videos")
    accs, video_f1 = [], []
    rows: dict[str, list[np.ndarray]] = {"jaccard": [], "precision": [], "recall": [], "f1": []}
    for (pred, gt), rate in zip(videos, rates, strict=True):
        pred, gt = np.asarray(pred), np.asarray(gt)
        keep = gt >= 0
        pred, gt = pred[keep], gt[keep]
        if len(gt) == 0:
            continue
        if relaxed:
            diff = relaxed_diff(pred, gt, rate, cholec80_rules, window_s, matlab_compat=matlab_compat)
            correct = diff == 0
        else:
            correct = pred == gt
        scores = phase_video_scores(pred, gt, num_phases, correct, matlab_compat=matlab_compat)
        accs.append(scores["accuracy"])
        video_f1.append(float(np.nanmean(scores["f1"])) if not np.isnan(scores["f1"]).all() else 0.0)
        for key in rows:
            rows[key].append(scores[key])
    if matlab_compat:
        out: dict[str, Any] = {
            "accuracy": float(np.mean(accs)) if accs else np.nan,
            "accuracy_std_videos": _matlab_std(np.array(accs)),
        }
        for key, how in (("jaccard", "mean"), ("precision", "nanmean"), ("recall", "mean")):
            per_phase, mean, std = _per_phase_then_mean(rows[key], num_phases, matlab=how)
            out |= {key: mean, f"{key}_std_phases": std, f"{key}_per_phase": per_phase}
        out.update(videos=len(accs), relaxed=True, protocol=protocol, matlab_compat=True)
        return out
    out = {
        "accuracy": float(np.mean(accs)) if accs else 0.0,
        "accuracy_std_videos": float(np.std(accs)) if accs else 0.0,
        "macro_f1": float(np.mean(video_f1)) if video_f1 else 0.0,
    }
    for key, table in rows.items():
        per_phase, mean, std = _per_phase_then_mean(table, num_phases)
        out[key] = mean
        out[f"{key}_std_phases"] = std
        out[f"{key}_per_phase"] = per_phase
    out.update(videos=len(accs), relaxed=relaxed, protocol=protocol if relaxed else None)
    return out


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
