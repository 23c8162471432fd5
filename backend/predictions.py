"""Model outputs -> Label Studio prediction JSON, one model class per task style (image, video).

Every task gets exactly one prediction ``{"model_version", "score", "result": [...]}``: Label Studio drops a
whole batch when the number of results differs from the number of tasks. The top-level ``score`` is the
model's confidence (``1 - mean normalised entropy``), so sorting by prediction score in Label Studio's data
manager puts the most uncertain frames first (an active-learning queue).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from surgenet_assist.core.encoders import mask_to_brush_rle

from .config import (
    BRUSH,
    CVS_CRITERION,
    CVS_MULTI,
    PHASE_CHOICE,
    POLYGON,
    TIMELINE,
    ConfigPlan,
    ControlPlan,
    LabelConfigError,
)
from .media import MediaError, load_image

log = logging.getLogger("surgenet_assist.backend")

#: CVS criterion counts as met at or above this probability
CVS_THRESHOLD = 0.5
#: polygons smaller than this fraction of the image are noise, not regions
MIN_POLYGON_AREA = 0.0005
#: polygon simplification tolerance, fraction of the contour's perimeter
POLYGON_EPSILON = 0.002


def empty_prediction(model_version: str) -> dict[str, Any]:
    """The prediction for a task when there is nothing to say (no model yet, nothing fillable)."""
    return {"model_version": model_version, "score": 0.0, "result": []}


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


# ---------------------------------------------------------------------------------------------------
# regions
# ---------------------------------------------------------------------------------------------------
def brush_regions(ctrl: ControlPlan, mask: np.ndarray, confidence: np.ndarray | None) -> list[dict[str, Any]]:
    """One RLE region per class present (foreground 255), with the mean pixel confidence as its score."""
    h, w = mask.shape
    out = []
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    for cid in present:
        label = ctrl.labels.get(int(cid))
        if label is None:
            continue
        binary = mask == cid
        score = float(confidence[binary].astype(np.float32).mean()) if confidence is not None else 1.0
        out.append(
            {
                "id": f"{ctrl.name}-{int(cid)}",
                "from_name": ctrl.name,
                "to_name": ctrl.to_name,
                "type": "brushlabels",
                "original_width": int(w),
                "original_height": int(h),
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": mask_to_brush_rle(binary.astype(np.uint8) * 255),
                    "brushlabels": [label],
                },
                "score": _r(score),
                "readonly": False,
            }
        )
    return out


def polygon_regions(
    ctrl: ControlPlan, mask: np.ndarray, confidence: np.ndarray | None
) -> list[dict[str, Any]]:
    """Outer contours of each class (OpenCV), simplified, points in percent of the image."""
    h, w = mask.shape
    out = []
    for cid in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)):
        label = ctrl.labels.get(int(cid))
        if label is None:
            continue
        binary = (mask == cid).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for k, contour in enumerate(contours):
            if cv2.contourArea(contour) < MIN_POLYGON_AREA * h * w:
                continue
            approx = cv2.approxPolyDP(contour, POLYGON_EPSILON * cv2.arcLength(contour, True), True)
            pts = approx.reshape(-1, 2)
            if len(pts) < 3:
                continue
            region_mask = np.zeros_like(binary)
            cv2.drawContours(region_mask, [contour], -1, 1, thickness=-1)
            sel = region_mask.astype(bool) & binary.astype(bool)
            score = (
                float(confidence[sel].astype(np.float32).mean())
                if confidence is not None and sel.any()
                else 1.0
            )
            out.append(
                {
                    "id": f"{ctrl.name}-{int(cid)}-{k}",
                    "from_name": ctrl.name,
                    "to_name": ctrl.to_name,
                    "type": "polygonlabels",
                    "original_width": int(w),
                    "original_height": int(h),
                    "image_rotation": 0,
                    "value": {
                        "points": [[_r(x / w * 100, 3), _r(y / h * 100, 3)] for x, y in pts.tolist()],
                        "closed": True,
                        "polygonlabels": [label],
                    },
                    "score": _r(score),
                    "readonly": False,
                }
            )
    return out


def cvs_regions(ctrl: ControlPlan, cvs_probs: np.ndarray) -> list[dict[str, Any]]:
    """CVS as one multiple-choice region, or a yes/no region for a per-criterion control."""
    probs = np.asarray(cvs_probs, dtype=np.float64)
    if ctrl.kind == CVS_CRITERION:
        assert ctrl.criterion is not None and ctrl.yes_no is not None
        p = float(probs[ctrl.criterion])
        met = p >= CVS_THRESHOLD
        value = ctrl.yes_no[0] if met else ctrl.yes_no[1]
        return [_choice_region(ctrl, [value], p if met else 1 - p)]
    chosen = [(cid, label) for cid, label in sorted(ctrl.labels.items()) if probs[cid] >= CVS_THRESHOLD]
    if not ctrl.multiple and chosen:
        cid, label = max(chosen, key=lambda item: probs[item[0]])
        chosen = [(cid, label)]
    certainty = [max(probs[c], 1 - probs[c]) for c in ctrl.labels]
    if not chosen:
        return []  # nothing met: an empty choices value is not allowed, and "none" is the absence of a region
    return [_choice_region(ctrl, [label for _, label in chosen], float(np.mean(certainty)))]


def phase_choice_regions(ctrl: ControlPlan, phase_probs: np.ndarray) -> list[dict[str, Any]]:
    """The most probable phase among those the config offers."""
    probs = np.asarray(phase_probs, dtype=np.float64)
    pid = max(ctrl.labels, key=lambda i: probs[i])
    return [_choice_region(ctrl, [ctrl.labels[pid]], float(probs[pid]))]


def _choice_region(ctrl: ControlPlan, choices: list[str], score: float) -> dict[str, Any]:
    return {
        "id": f"{ctrl.name}-0",
        "from_name": ctrl.name,
        "to_name": ctrl.to_name,
        "type": "choices",
        "value": {"choices": choices},
        "score": _r(score),
        "readonly": False,
    }


def timeline_regions(
    ctrl: ControlPlan,
    segments: Sequence[tuple[int, int, int]],
    video_fps: float,
    frame_count: int,
    frame_rate: float,
    phase_probs: np.ndarray | None = None,
    sample_indices: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Phase segments (first/last decoded frame index, 0-based) -> ``timelinelabels`` regions.

    A segment covers the video from its first sampled frame to the frame before the next segment starts (the
    last one to the end), converted to the config's ``frameRate`` through time, 1-based and inclusive, as
    Label Studio counts frames. Phases the config does not offer are left out (a gap in the timeline).
    """
    total = max(1, int(math.floor(frame_count / video_fps * frame_rate + 1e-6)))
    out = []
    for k, (first, _last, phase) in enumerate(segments):
        label = ctrl.labels.get(int(phase))
        nxt = segments[k + 1][0] if k + 1 < len(segments) else frame_count
        start = int(math.floor(first / video_fps * frame_rate + 1e-6)) + 1
        end = int(math.floor(nxt / video_fps * frame_rate + 1e-6))
        start, end = min(start, total), min(max(end, start), total)
        if label is None:
            continue
        score = 1.0
        if phase_probs is not None and sample_indices is not None:
            sel = (sample_indices >= first) & (sample_indices < nxt)
            if sel.any():
                score = float(phase_probs[sel, int(phase)].mean())
        out.append(
            {
                "id": f"{ctrl.name}-{k}",
                "from_name": ctrl.name,
                "to_name": ctrl.to_name,
                "type": "timelinelabels",
                "value": {"ranges": [{"start": start, "end": end}], "timelinelabels": [label]},
                "score": _r(score),
                "readonly": False,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------
# models per task style
# ---------------------------------------------------------------------------------------------------
Fetch = Callable[[str, Any], Path]


def _task_value(task: dict[str, Any], key: str, what: str) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise MediaError(f"task {task.get('id')} has no 'data' object", url=None)
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise MediaError(
            f"task {task.get('id')} has no {what} under data.{key} (keys: {sorted(data)[:10]})",
            url=None,
            hint=f"the labeling config reads ${key}; import tasks with that key",
        )
    return value


class ImageTaskModel:
    """Frame tasks (``<Image>``): masks, polygons, CVS and phase choices, batched through the Predictor."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def predict(self, tasks: list[dict[str, Any]], plan: ConfigPlan, fetch: Fetch) -> list[dict[str, Any]]:
        controls = plan.image_controls
        keys = sorted({c.value_key for c in controls})
        if len(keys) != 1:
            raise LabelConfigError(
                f"image controls point at {len(keys)} Image tags", "use one <Image> per config"
            )
        frames = []
        for task in tasks:
            url = _task_value(task, keys[0], "image")
            frames.append(load_image(fetch(url, task.get("id")), url))
        need_masks = any(c.kind in (BRUSH, POLYGON) for c in controls)
        preds = self.predictor.predict(frames, keep_masks=need_masks)
        version = self.predictor.model_version
        out = []
        for fp in preds:
            result = image_regions(controls, fp.mask, fp.confidence, fp.cvs_probs, fp.phase_probs)
            out.append({"model_version": version, "score": _r(fp.score), "result": result})
        return out


def image_regions(
    controls: Sequence[ControlPlan],
    mask: np.ndarray | None,
    confidence: np.ndarray | None,
    cvs_probs: np.ndarray | None,
    phase_probs: np.ndarray | None,
) -> list[dict[str, Any]]:
    """Regions of one frame for every image control; a missing output (None) leaves its controls empty."""
    result: list[dict[str, Any]] = []
    for ctrl in controls:
        if ctrl.kind == BRUSH and mask is not None:
            result += brush_regions(ctrl, mask, confidence)
        elif ctrl.kind == POLYGON and mask is not None:
            result += polygon_regions(ctrl, mask, confidence)
        elif ctrl.kind in (CVS_MULTI, CVS_CRITERION) and cvs_probs is not None:
            result += cvs_regions(ctrl, cvs_probs)
        elif ctrl.kind == PHASE_CHOICE and phase_probs is not None:
            result += phase_choice_regions(ctrl, phase_probs)
    return result


class VideoTaskModel:
    """Video tasks (``<Video>``): phase timeline (TimelineLabels) and clip-level CVS (max over the clip)."""

    def __init__(self, predictor: Any, sample_fps: float | None = 1.0) -> None:
        self.predictor = predictor
        self.sample_fps = sample_fps

    def predict(self, tasks: list[dict[str, Any]], plan: ConfigPlan, fetch: Fetch) -> list[dict[str, Any]]:
        from surgenet_assist.core.video import open_video

        controls = plan.video_controls
        out = []
        for task in tasks:
            key = controls[0].value_key
            url = _task_value(task, key, "video")
            path = fetch(url, task.get("id"))
            try:
                with open_video(path) as video:
                    fps, count = float(video.fps), int(video.frame_count)
                vp = self.predictor.predict_video(path, sample_fps=self.sample_fps)
            except Exception as exc:  # noqa: BLE001 - VideoReadError and decoder failures
                raise MediaError(
                    f"cannot decode video {url}: {getattr(exc, 'message', exc)}",
                    url=url,
                    hint="check that the file is a complete, supported video",
                ) from None
            result: list[dict[str, Any]] = []
            for ctrl in controls:
                if ctrl.kind == TIMELINE:
                    rate = ctrl.frame_rate or _task_rate(task, ctrl) or fps
                    result += timeline_regions(
                        ctrl, vp.segments, fps, count, rate, vp.phase_timeline_probs, np.asarray(vp.indices)
                    )
                elif ctrl.kind in (CVS_MULTI, CVS_CRITERION):
                    result += cvs_regions(ctrl, np.asarray(vp.cvs_probs).max(axis=0))
            unc = np.mean([np.mean(v) for v in vp.uncertainty.values()]) if vp.uncertainty else 1.0
            out.append(
                {"model_version": self.predictor.model_version, "score": _r(1.0 - unc), "result": result}
            )
        return out


def _task_rate(task: dict[str, Any], ctrl: ControlPlan) -> float | None:
    if not ctrl.frame_rate_key:
        return None
    try:
        rate = float((task.get("data") or {}).get(ctrl.frame_rate_key))
    except (TypeError, ValueError):
        return None
    return rate if rate > 0 else None


def day_one_predictions(
    tasks: list[dict[str, Any]], plan: ConfigPlan, assist: Any, fetch: Fetch, sample_fps: float | None
) -> list[dict[str, Any]]:
    """Before a champion wins: propagated masks for frames of videos with human masks on other frames,
    propagated phase timelines for videos with phase labels, the instant heads for everything else.

    ``assist`` is a :class:`surgenet_assist.training_loop.assist.DayOneAssist`; model versions say which
    source answered (``propagation-<label version>`` or the instant head's ``instant-...``).
    """
    from surgenet_assist.core.video import open_video

    instant = assist.instant_predictor()
    out = []
    for task in tasks:
        data = task.get("data") or {}
        version, score, result = None, 1.0, []
        if plan.image_controls:
            key = plan.image_controls[0].value_key
            url = _task_value(task, key, "image")
            image = load_image(fetch(url, task.get("id")), url)
            fp = instant.predict([image])[0] if instant is not None else None
            mask = conf = None
            if fp is not None:
                mask, conf, version, score = fp.mask, fp.confidence, instant.model_version, fp.score
            if data.get("source_video") is not None:
                prop = assist.propagated(str(data["source_video"]), int(data.get("frame_index") or 0), image)
                if prop is not None:
                    mask, conf = prop["mask"], prop["confidence"]
                    version, score = f"propagation-{prop['label_version']}", prop["frame"].confidence
            result += image_regions(
                plan.image_controls,
                mask,
                conf,
                fp.cvs_probs if fp is not None else None,
                fp.phase_probs if fp is not None else None,
            )
        if plan.video_controls:
            key = plan.video_controls[0].value_key
            url = _task_value(task, key, "video")
            path = fetch(url, task.get("id"))
            with open_video(path) as video:
                fps, count = float(video.fps), int(video.frame_count)
            timeline = assist.phase_timeline(url)
            segments, probs, indices, cvs = None, None, None, None
            if timeline is not None:
                segments, probs, indices = timeline["segments"], timeline["probs"], timeline["indices"]
                cvs = timeline["cvs"]
                version = f"propagation-{timeline['label_version']}"
            elif instant is not None and instant.heads.has_phase:
                vp = instant.predict_video(url, sample_fps)
                segments, probs, indices = vp.segments, vp.phase_timeline_probs, vp.indices
                cvs = vp.cvs_probs if instant.heads.has_cvs else None
                version = instant.model_version
            for ctrl in plan.video_controls:
                if ctrl.kind == TIMELINE and segments is not None:
                    rate = ctrl.frame_rate or _task_rate(task, ctrl) or fps
                    result += timeline_regions(ctrl, segments, fps, count, rate, probs, np.asarray(indices))
                elif ctrl.kind in (CVS_MULTI, CVS_CRITERION) and cvs is not None:
                    result += cvs_regions(ctrl, np.asarray(cvs).max(axis=0))
        if version is None:
            out.append(empty_prediction(assist.no_model_version))
        else:
            out.append({"model_version": version, "score": _r(score), "result": result})
    return out
