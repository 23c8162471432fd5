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


# --- intervals: the unit of resampling is the video ------------------------------------------------------
#: Resamples of the pre-registered bootstrap (bench/README.md, "Interactive segmentation, NoC").
BOOTSTRAP_RESAMPLES = 2000


def video_bootstrap(
    values: np.ndarray,
    videos: Sequence[str] | None,
    statistic: Callable[[np.ndarray], float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(point, low, high): ``statistic`` of the (objects, ...) array ``values`` and its percentile bootstrap
    interval, resampling **videos** with replacement and keeping each video's objects together (objects of one
    frame or clip share lighting, tools and backbone quirks, so they are not independent; resampling them
    alone gives intervals too narrow). ``videos`` names each row's video; ``None`` makes each row its own
    unit (only right for independent objects)."""
    values = np.asarray(values, np.float64)
    names = list(videos) if videos is not None else [str(i) for i in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"{len(names)} video names for {len(values)} objects")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    members = [np.asarray(g) for g in groups.values()]
    point = float(statistic(values))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for b in range(resamples):
        pick = rng.integers(0, len(members), len(members))
        draws[b] = statistic(values[np.concatenate([members[j] for j in pick])])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return point, float(low), float(high)


def noc_array(sessions: Sequence[ClickSession], max_clicks: int = MAX_CLICKS) -> np.ndarray:
    """(objects, 5) per-object NoC@85, NoC@90, IoU@1, IoU@3, IoU@5 (what the intervals resample)."""
    return np.asarray(
        [
            [s.noc(0.85, max_clicks), s.noc(0.90, max_clicks), s.iou_at(1), s.iou_at(3), s.iou_at(5)]
            for s in sessions
        ],
        np.float64,
    ).reshape(-1, 5)


METRIC_COLUMNS = ("noc85", "noc90", "iou@1", "iou@3", "iou@5")


def summary_intervals(
    sessions: Sequence[ClickSession],
    videos: Sequence[str] | None,
    *,
    max_clicks: int = MAX_CLICKS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Metric -> [mean, 95 % low, 95 % high] over objects, the interval by video bootstrap."""
    table = noc_array(sessions, max_clicks)
    out = {}
    for j, name in enumerate(METRIC_COLUMNS):
        point, low, high = video_bootstrap(
            table[:, j], videos, lambda v: float(v.mean()), resamples=resamples, seed=seed
        )
        out[name] = [point, low, high]
    return out


def noc_ratio(
    a: Sequence[ClickSession],
    b: Sequence[ClickSession],
    videos: Sequence[str] | None,
    *,
    threshold: float = 0.90,
    max_clicks: int = MAX_CLICKS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(ratio, low, high) of mean NoC@``threshold`` of method ``a`` over method ``b`` on the same objects,
    the pre-registered decision statistic: ``a`` needs fewer clicks than ``b`` when ``high < 1``. Paired:
    a resample takes the same videos for both methods."""
    if len(a) != len(b):
        raise ValueError(f"the two methods were run on {len(a)} and {len(b)} objects: not paired")
    pairs = np.asarray(
        [[sa.noc(threshold, max_clicks), sb.noc(threshold, max_clicks)] for sa, sb in zip(a, b, strict=True)],
        np.float64,
    ).reshape(-1, 2)
    return video_bootstrap(
        pairs, videos, lambda v: float(v[:, 0].mean() / v[:, 1].mean()), resamples=resamples, seed=seed
    )
