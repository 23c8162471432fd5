"""The standard simulated annotator and the NoC / IoU@k metrics of interactive segmentation.

Follows the protocol of RITM (Sofiiuk et al.), reused by SimpleClick, FocalClick and MIS: the next click goes
to the pixel deepest inside the larger error region (the maximum of the distance transform of the false
negatives or the false positives, the image border counting as boundary, already clicked pixels excluded);
it is positive when that pixel is a missed object pixel, negative when it is a false one. The first click on
an empty prediction is therefore positive, at the object's most interior point. NoC@t is the number of clicks
until IoU >= t, counting ``max_clicks`` when it is never reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .prompts import Click, Prompt

MAX_CLICKS = 20


def iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two boolean masks (pixels where ``ignore`` is set do not count)."""
    if ignore is not None:
        pred, gt = pred & ~ignore, gt & ~ignore
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def error_depth(region: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``region`` to its edge, the image border counting as an edge (RITM)."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(gt: np.ndarray, pred: np.ndarray, clicked: np.ndarray | None = None) -> Click | None:
    """Where the simulated annotator clicks next (``None`` when prediction and truth agree)."""
    fn = gt & ~pred
    fp = ~gt & pred
    fn_depth, fp_depth = error_depth(fn), error_depth(fp)
    if clicked is not None:
        fn_depth[clicked] = 0
        fp_depth[clicked] = 0
    positive = fn_depth.max() > fp_depth.max()
    depth = fn_depth if positive else fp_depth
    if depth.max() <= 0:
        return None
    rows, cols = np.where(depth == depth.max())  # first in raster order, as RITM
    return Click(float(rows[0]), float(cols[0]), bool(positive))


Segment = Callable[[Prompt], np.ndarray]  # prompt -> (H, W) bool mask


@dataclass
class ClickSession:
    """IoU after each simulated click of one object."""

    ious: list[float]
    clicks: list[Click]

    def noc(self, threshold: float, max_clicks: int = MAX_CLICKS) -> int:
        return noc(self.ious, threshold, max_clicks)

    def iou_at(self, k: int) -> float:
        """IoU after ``k`` clicks (the last one when the session stopped early because it was perfect)."""
        return self.ious[min(k, len(self.ious)) - 1] if self.ious else 0.0


def simulate(
    segment: Segment,
    gt: np.ndarray,
    max_clicks: int = MAX_CLICKS,
    stop_at: float | None = None,
    feed_previous: bool = True,
    min_clicks: int = 0,
) -> ClickSession:
    """Run the simulated annotator against ``segment`` on one object's truth ``gt``; stop once IoU reaches
    ``stop_at`` after at least ``min_clicks`` (``None``: always run ``max_clicks``, as RITM's IoU analysis).
    ``feed_previous`` passes the last mask back as the prompt's previous mask (RITM's ITER-M)."""
    gt = gt.astype(bool)
    pred = np.zeros_like(gt)
    clicked = np.zeros_like(gt)
    prompt = Prompt()
    ious: list[float] = []
    clicks: list[Click] = []
    for _ in range(max_clicks):
        click = next_click(gt, pred, clicked)
        if click is None:  # nothing left to correct: the remaining clicks keep the same IoU
            break
        clicks.append(click)
        r, c = int(click.row), int(click.col)
        clicked[max(0, r - 2) : r + 3, max(0, c - 2) : c + 3] = True
        prompt = Prompt(
            prompt.clicks + (click,), None, pred.copy() if feed_previous and ious else None
        )
        pred = segment(prompt).astype(bool)
        ious.append(iou(pred, gt))
        if stop_at is not None and ious[-1] >= stop_at and len(ious) >= min_clicks:
            break
    return ClickSession(ious, clicks)


def noc(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """Clicks until IoU >= ``threshold`` (``max_clicks`` when never)."""
    for k, value in enumerate(ious[:max_clicks], start=1):
        if value >= threshold:
            return k
    return max_clicks


def summarize(sessions: Sequence[ClickSession], max_clicks: int = MAX_CLICKS) -> dict[str, float]:
    """NoC@85/90, NoF@90 (objects never reaching 0.90) and mean IoU after 1, 3 and 5 clicks."""
    if not sessions:
        return {}
    out = {
        "noc85": float(np.mean([s.noc(0.85, max_clicks) for s in sessions])),
        "noc90": float(np.mean([s.noc(0.90, max_clicks) for s in sessions])),
        "nof90": int(sum(s.noc(0.90, max_clicks) >= max_clicks for s in sessions)),
        "objects": len(sessions),
    }
    for k in (1, 3, 5):
        out[f"iou@{k}"] = float(np.mean([s.iou_at(k) for s in sessions]))
    return out
