"""Annotation effort: a cited time model and a simulated annotator that brings labels to a target quality.

Every part of the project has its own benchmark (NoC, propagation against copy, label ratios); what a team
pays is the time to bring a video's labels to a quality it accepts. This module prices that time:

- :class:`TimeModel`: seconds per action (click, polygon vertex, timeline edit, CVS toggle, frame review),
  each value's source in ``docs/effort.md`` (published annotation studies where one exists, a stated
  assumption where none does; the bench reports how its conclusions move when they change);
- the simulated annotator, per 1 fps keyframe: each object (a class's region) is corrected until its IoU is
  at least ``target_iou`` (0.90) -- with the click engine when one is given (the same RITM clicker as the
  interactive benchmark, :func:`~surgenet_assist.core.interactive.clicker.next_click`, at most 20 clicks,
  stopping after 3 that did not help), the rest fixed with polygons, the cheapest of dragging the wrong
  vertices, tracing the error regions or redrawing (vertices from ``cv2.approxPolyDP``); the phase
  timeline by boundary edits until its segments match; CVS by toggling the wrong criteria. It counts its
  actions by kind and returns the quality it reached, which equals the targets by construction *and is
  measured*, so workflows compare at equal quality.

Only labels and masks go in (no model, no training): the workflows that produce pre-annotations live with
the training loop (``training_loop/effort.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields

import cv2
import numpy as np

from .interactive.clicker import MAX_CLICKS, iou, next_click
from .interactive.objects import MIN_OBJECT_FRACTION
from .interactive.prompts import Click, Prompt
from .timeline import runs

#: an object's mask must reach this IoU against the truth (the interactive benchmark's NoC@90 target)
TARGET_IOU = 0.90
#: Douglas-Peucker tolerances (pixels) an annotator's polygon is tried at, coarsest first
POLYGON_EPSILONS = (2.0, 1.0, 0.5)
#: clicks in a row without a better mask after which the annotator stops clicking and traces the rest
PATIENCE = 3

Segment = Callable[[Prompt], np.ndarray]  # prompt -> (H, W) bool mask, for one object on one frame


@dataclass(frozen=True)
class TimeModel:
    """Seconds per annotator action. Sources: ``docs/effort.md`` ("Time model")."""

    click_s: float = 1.75  # Papadopoulos et al. 2017: 7.0 s per box of 4 extreme clicks
    vertex_s: float = 1.0  # assumption (no per-vertex study found); sensitivity in the bench
    boundary_edit_s: float = 5.0  # assumption: seek to a frame, drag a boundary or pick a label
    toggle_s: float = 1.75  # a checkbox click, priced as a click
    frame_review_s: float = 3.0  # assumption: look over one keyframe's masks, phase and CVS

    def seconds(self, actions: Actions) -> float:
        """Annotator time for ``actions`` (linear: each action costs its price, review included)."""
        return (
            actions.clicks * self.click_s
            + actions.vertices * self.vertex_s
            + actions.boundary_edits * self.boundary_edit_s
            + actions.toggles * self.toggle_s
            + actions.frames_reviewed * self.frame_review_s
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Actions:
    """What the annotator did, by kind (a deleted region counts as one click: select and delete)."""

    clicks: int = 0
    vertices: int = 0
    boundary_edits: int = 0
    toggles: int = 0
    frames_reviewed: int = 0

    def __add__(self, other: Actions) -> Actions:
        return Actions(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# polygons
# --------------------------------------------------------------------------------------------------------
def trace_polygons(region: np.ndarray, epsilon: float) -> tuple[int, np.ndarray]:
    """Vertices an annotator places to trace ``region`` (outer outlines and holes, each simplified by
    ``cv2.approxPolyDP`` at ``epsilon`` px, at least 3 vertices each) and the mask those polygons fill."""
    region = np.ascontiguousarray(region.astype(np.uint8))
    contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0, np.zeros(region.shape, bool)
    polys = [cv2.approxPolyDP(c, epsilon, True) for c in contours]
    vertices = sum(max(3, len(p)) for p in polys)
    return vertices, _fill(polys, hierarchy, region.shape)


def trace_object(
    gt: np.ndarray, ignore: np.ndarray | None = None, target: float = TARGET_IOU
) -> tuple[int, np.ndarray]:
    """An object drawn from scratch as polygons: the coarsest tolerance whose filled polygons reach
    ``target`` IoU; an object too small for any (a few pixels) is outlined pixel by pixel (every contour
    point a vertex). Returns (vertices, mask)."""
    gt = gt.astype(bool)
    for eps in POLYGON_EPSILONS:
        vertices, mask = trace_polygons(gt, eps)
        if iou(mask, gt, ignore) >= target:
            return vertices, mask
    contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return sum(max(3, len(c)) for c in contours), gt.copy()


def _fill(polys: list[np.ndarray], hierarchy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Mask of outlines minus holes (``RETR_CCOMP`` hierarchy: a contour with a parent is a hole)."""
    filled = np.zeros(shape, np.uint8)
    for poly, info in zip(polys, hierarchy[0], strict=True):
        if info[3] < 0:
            cv2.fillPoly(filled, [poly], 1)
    for poly, info in zip(polys, hierarchy[0], strict=True):
        if info[3] >= 0:
            cv2.fillPoly(filled, [poly], 0)
    return filled.astype(bool)


def vertex_edit(
    mask: np.ndarray, gt: np.ndarray, epsilon: float = POLYGON_EPSILONS[0], tolerance: float = 2.0
) -> tuple[int, np.ndarray]:
    """The pre-annotated region shown as polygons (traced at ``epsilon`` px); every vertex farther than
    ``tolerance`` px from the true outline is dragged onto its nearest outline point, one action each (the
    correction protocol of Polygon-RNN, Castrejon et al. 2017). Returns (vertices moved, mask)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    gt8 = gt.astype(np.uint8)
    edge = gt8 & ~cv2.erode(gt8, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    if not contours or not edge.any():
        return 0, mask.astype(bool)
    dist, labels = cv2.distanceTransformWithLabels(
        (1 - edge).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    ys, xs = np.nonzero(edge)
    where = np.zeros((int(labels.max()) + 1, 2), np.int32)
    where[labels[ys, xs]] = np.stack([xs, ys], 1)
    moved = 0
    polys = []
    for contour in contours:
        poly = cv2.approxPolyDP(contour, epsilon, True).copy()
        for p in poly:
            x, y = int(p[0][0]), int(p[0][1])
            if dist[y, x] > tolerance:
                p[0] = where[labels[y, x]]
                moved += 1
        polys.append(poly)
    return moved, _fill(polys, hierarchy, gt.shape)


def polygon_fix(
    mask: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None, target: float = TARGET_IOU
) -> tuple[int, np.ndarray]:
    """Correct ``mask`` towards ``gt`` with polygon actions, the cheapest of: drag the pre-annotation's
    wrong vertices (:func:`vertex_edit`, then trace what is still missing or false), trace the error regions
    (missed parts added, false parts erased), or redraw the object. Returns (vertex actions, mask)."""
    mask, gt = mask.astype(bool), gt.astype(bool)
    best = trace_object(gt, ignore, target)
    moved, edited = vertex_edit(mask, gt)
    for cost, start in ((0, mask), (moved, edited)):
        if cost >= best[0]:
            continue
        if iou(start, gt, ignore) >= target:
            best = (cost, start)
            continue
        traced, fixed = trace_errors(start, gt, ignore, target, best[0] - cost)
        if fixed is not None:
            best = (cost + traced, fixed)
    return best


def trace_errors(
    mask: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None, target: float, budget: int
) -> tuple[int, np.ndarray | None]:
    """Polygons around the error regions of ``mask`` (missed parts added, false parts erased) at the
    coarsest tolerance that reaches ``target`` within ``budget`` vertices; (0, None) when none does."""
    valid = np.ones_like(gt) if ignore is None else ~ignore
    for eps in POLYGON_EPSILONS:
        v_add, add = trace_polygons(gt & ~mask & valid, eps)
        v_del, rem = trace_polygons(mask & ~gt & valid, eps)
        if v_add + v_del >= budget:
            break  # finer tolerances only cost more vertices
        fixed = (mask | add) & ~rem
        if iou(fixed, gt, ignore) >= target:
            return v_add + v_del, fixed
    return 0, None


# --------------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------------
@dataclass
class ObjectResult:
    """One object on one keyframe: what it cost and what it reached."""

    class_id: int
    actions: Actions
    iou: float
    how: str  # "accepted" | "clicks" | "clicks+polygon" | "polygon" | "deleted"


def click_correct(
    segment: Segment,
    gt: np.ndarray,
    start: np.ndarray,
    ignore: np.ndarray | None = None,
    target: float = TARGET_IOU,
    max_clicks: int = MAX_CLICKS,
    patience: int = PATIENCE,
) -> tuple[int, np.ndarray]:
    """Corrective clicks on ``start`` (the pre-annotation, fed to the engine as the previous mask) placed by
    the interactive benchmark's clicker, until IoU >= ``target``, ``max_clicks``, or ``patience`` clicks in a
    row that did not improve the mask (an annotator stops clicking when clicks stop helping). The annotator
    keeps the best mask it has seen (undo is free: a mask a click made worse is not kept). Returns (clicks,
    mask)."""
    gt = gt.astype(bool)
    valid = np.ones_like(gt) if ignore is None else ~ignore
    pred = start.astype(bool).copy()
    best, best_iou = pred.copy(), iou(pred, gt, ignore)
    clicked = np.zeros_like(gt)
    clicks: tuple[Click, ...] = ()
    used = stale = 0
    while used < max_clicks and stale < patience:
        # clicks go to errors outside ignored pixels (the annotator has no truth there)
        click = next_click(gt & valid, pred & valid, clicked)
        if click is None:
            break
        new = [click]
        if not click.positive and not any(c.positive for c in clicks):
            # the engine needs to know where the object is: a first positive click at its most interior
            # point (the RITM first click), then the negative one
            anchor = next_click(gt & valid, np.zeros_like(gt), clicked)
            if anchor is not None:
                new.insert(0, anchor)
        for c in new:
            r, col = int(c.row), int(c.col)
            clicked[max(0, r - 2) : r + 3, max(0, col - 2) : col + 3] = True
        clicks = (*clicks, *new)
        used += len(new)
        pred = segment(Prompt(clicks, None, pred.copy())).astype(bool)
        value = iou(pred, gt, ignore)
        stale += 1
        if value > best_iou:
            best, best_iou, stale = pred.copy(), value, 0
        if best_iou >= target:
            break
    return used, best


def correct_object(
    class_id: int,
    gt: np.ndarray,
    start: np.ndarray | None,
    ignore: np.ndarray | None = None,
    segment: Segment | None = None,
    target: float = TARGET_IOU,
    max_clicks: int = MAX_CLICKS,
    min_click_area: float = MIN_OBJECT_FRACTION,
) -> ObjectResult:
    """Bring one object to ``target`` IoU from ``start`` (None: nothing pre-annotated). An object smaller
    than ``min_click_area`` of the frame (the interactive benchmark's object size, ``MIN_OBJECT_FRACTION``:
    below it the engine's stride-8 grid cannot resolve it) is traced, not clicked."""
    gt = gt.astype(bool)
    start = np.zeros_like(gt) if start is None else start.astype(bool)
    valid_gt = gt if ignore is None else gt & ~ignore
    if not valid_gt.any():
        # the class is not in the truth (outside ignored pixels): a pre-annotated region is deleted
        if (start if ignore is None else start & ~ignore).any():
            return ObjectResult(class_id, Actions(clicks=1), 1.0, "deleted")
        return ObjectResult(class_id, Actions(), 1.0, "accepted")
    if iou(start, gt, ignore) >= target:
        return ObjectResult(class_id, Actions(), iou(start, gt, ignore), "accepted")
    clicks, how, mask = 0, "polygon", start
    if segment is not None and valid_gt.mean() < min_click_area:
        segment = None  # too small for the click engine: traced
    if segment is not None:
        clicks, mask = click_correct(segment, gt, start, ignore, target, max_clicks)
        how = "clicks"
    vertices = 0
    if iou(mask, gt, ignore) < target:
        vertices, mask = polygon_fix(mask, gt, ignore, target)
        how = "clicks+polygon" if segment is not None else "polygon"
    return ObjectResult(class_id, Actions(clicks=clicks, vertices=vertices), iou(mask, gt, ignore), how)


@dataclass
class FrameResult:
    """One keyframe's masks brought to the target."""

    actions: Actions
    objects: list[ObjectResult] = field(default_factory=list)

    @property
    def min_iou(self) -> float:
        return min((o.iou for o in self.objects), default=1.0)


def annotate_masks(
    gt_mask: np.ndarray,
    pre_mask: np.ndarray | None,
    ignore_index: int,
    segment_for: Callable[[int], Segment] | None = None,
    target: float = TARGET_IOU,
    classes: Iterable[int] | None = None,
) -> FrameResult:
    """Every class region of one keyframe (in the truth or in the pre-annotation) brought to ``target`` IoU.

    ``segment_for(class_id)`` gives the click engine for this frame (None: polygons only). Pixels marked
    ``ignore_index`` in the truth do not count (the annotator cannot be wrong there)."""
    ignore = gt_mask == ignore_index
    present = set(np.unique(gt_mask).tolist())
    if pre_mask is not None:
        present |= set(np.unique(pre_mask).tolist())
    present.discard(ignore_index)
    if classes is not None:
        present &= set(classes)
    total = Actions(frames_reviewed=1)
    objects = []
    for k in sorted(present):
        start = None if pre_mask is None else pre_mask == k
        segment = segment_for(k) if segment_for is not None else None
        result = correct_object(k, gt_mask == k, start, ignore, segment, target)
        objects.append(result)
        total = total + result.actions
    return FrameResult(total, objects)


# --------------------------------------------------------------------------------------------------------
# phase timeline and CVS
# --------------------------------------------------------------------------------------------------------
def _boundaries(labels: np.ndarray) -> set[int]:
    return {s for s, _, _ in runs(labels)[1:]}


def phase_edits(truth: np.ndarray, pre: np.ndarray | None) -> tuple[int, np.ndarray]:
    """Timeline edits that turn ``pre`` (None: an empty timeline) into ``truth``, and the timeline reached.

    One edit places, moves or deletes a boundary, or sets a segment's label. A missing true boundary and a
    wrong predicted one pair up as one move; the rest are placed or deleted one by one; then every true
    segment whose frames do not all carry its label yet is relabelled once. From scratch that is one
    boundary per change of phase plus one label per segment."""
    truth = np.asarray(truth, np.int64)
    if pre is None:
        segments = runs(truth)
        return 2 * len(segments) - 1, truth.copy()
    pre = np.asarray(pre, np.int64)
    true_b, pre_b = _boundaries(truth), _boundaries(pre)
    boundary = max(len(true_b - pre_b), len(pre_b - true_b))
    # after the boundary edits a segment keeps the label most of its frames had; relabel where that is wrong
    relabel = sum(1 for s, e, label in runs(truth) if np.bincount(pre[s:e]).argmax() != label)
    # the edited timeline: true boundaries, each segment carrying its true label
    return boundary + relabel, truth.copy()


def cvs_toggles(truth: np.ndarray, pre: np.ndarray | None) -> tuple[int, np.ndarray]:
    """Criteria toggled on one keyframe (None: all criteria start unticked) and the values reached."""
    truth = np.asarray(truth) > 0.5
    start = np.zeros_like(truth) if pre is None else np.asarray(pre) > 0.5
    return int((start != truth).sum()), truth.astype(np.float32)
