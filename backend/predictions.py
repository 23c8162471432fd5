"""Model outputs -> Label Studio predictions, one model class per task style (image, video).

The result regions come from core's translator (:mod:`surgenet_assist.core.formats.label_studio`), named after
the project's labeling config; this module runs the models and fetches the media.

Every task gets exactly one prediction ``{"model_version", "score", "result": [...]}``: Label Studio drops a
whole batch when the number of results differs from the number of tasks, and stores nothing for any task of
a request that fails. So a task whose media cannot be fetched or decoded gets an empty prediction (reported
through ``on_failure``) and the rest of the batch is served. The top-level ``score`` is the model's confidence
(``1 - mean normalised entropy``), so sorting by prediction score in Label Studio's data manager puts the most
uncertain frames first (an active-learning queue).

Every prediction of one request carries the same ``model_version``: the one ``/setup`` reports (Label Studio
skips a task that already has a prediction of that version, and asks again for every other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from surgenet_assist.core.formats.label_studio import image_regions, task_target, video_regions

from .config import BRUSH, POLYGON, ConfigPlan, LabelConfigError
from .media import MediaError, load_image
from .media_download import discard_if_cached

log = logging.getLogger("surgenet_assist.backend")


def empty_prediction(model_version: str) -> dict[str, Any]:
    """The prediction for a task when there is nothing to say (no model yet, nothing fillable)."""
    return {"model_version": model_version, "score": 0.0, "result": []}


#: ``on_failure(task, error)``: told about each task that gets an empty prediction because of its media.
#: Without one the MediaError is raised (``ls preannotate`` isolates and reports such tasks itself).
OnFailure = Callable[[dict[str, Any], MediaError], None]


def _failed(on_failure: OnFailure | None, task: dict[str, Any], exc: MediaError) -> None:
    if on_failure is None:
        raise exc
    on_failure(task, exc)


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


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

    def predict(
        self,
        tasks: list[dict[str, Any]],
        plan: ConfigPlan,
        fetch: Fetch,
        on_failure: OnFailure | None = None,
    ) -> list[dict[str, Any]]:
        """One prediction per task; with ``on_failure``, a task whose image cannot be fetched or decoded gets
        an empty one (without, its MediaError is raised)."""
        controls = plan.image_controls
        keys = sorted({c.value_key for c in controls})
        if len(keys) != 1:
            raise LabelConfigError(
                f"image controls point at {len(keys)} Image tags", "use one <Image> per config"
            )
        version = self.predictor.model_version
        out = [empty_prediction(version) for _ in tasks]
        frames, where = [], []
        for i, task in enumerate(tasks):
            try:
                url = _task_value(task, keys[0], "image")
                frames.append(load_image(fetch(url, task.get("id")), url))
                where.append(i)
            except MediaError as exc:
                _failed(on_failure, task, exc)
        if not frames:
            return out
        need_masks = any(c.kind in (BRUSH, POLYGON) for c in controls)
        preds = self.predictor.predict(frames, keep_masks=need_masks)
        for i, fp in zip(where, preds, strict=True):
            result = image_regions(controls, fp.mask, fp.confidence, fp.cvs_probs, fp.phase_probs)
            out[i] = {"model_version": version, "score": _r(fp.score), "result": result}
        return out


class VideoTaskModel:
    """Video tasks (``<Video>``): phase timeline (TimelineLabels) and clip-level CVS (max over the clip)."""

    def __init__(self, predictor: Any, sample_fps: float | None = 1.0) -> None:
        self.predictor = predictor
        self.sample_fps = sample_fps

    def predict(
        self,
        tasks: list[dict[str, Any]],
        plan: ConfigPlan,
        fetch: Fetch,
        on_failure: OnFailure | None = None,
    ) -> list[dict[str, Any]]:
        """One prediction per task; with ``on_failure``, a task whose video cannot be fetched or decoded gets
        an empty one (without, its MediaError is raised)."""
        controls = plan.video_controls
        out = []
        for task in tasks:
            key = controls[0].value_key
            try:
                url = _task_value(task, key, "video")
                path = fetch(url, task.get("id"))
                run = partial(self.predictor.predict_video, path, sample_fps=self.sample_fps)
                fps, count, vp = _decode_video(url, path, run)
            except MediaError as exc:
                _failed(on_failure, task, exc)
                out.append(empty_prediction(self.predictor.model_version))
                continue
            result = video_regions(
                controls, task, fps, count, vp.segments, vp.phase_timeline_probs, vp.indices, vp.cvs_probs
            )
            unc = np.mean([np.mean(v) for v in vp.uncertainty.values()]) if vp.uncertainty else 1.0
            out.append(
                {"model_version": self.predictor.model_version, "score": _r(1.0 - unc), "result": result}
            )
        return out


def day_one_predictions(
    tasks: list[dict[str, Any]],
    plan: ConfigPlan,
    assist: Any,
    fetch: Fetch,
    sample_fps: float | None,
    version: str | None = None,
    on_failure: OnFailure | None = None,
) -> list[dict[str, Any]]:
    """Before a champion wins: propagated masks for frames of videos with human masks on other frames,
    propagated phase timelines for videos with phase labels, the instant heads for everything else.

    ``assist`` is a :class:`surgenet_assist.training_loop.assist.DayOneAssist`. Every prediction carries
    ``version`` (default: ``assist.served_version()``, what ``/setup`` reports), whichever source answered a
    task; a task neither source can say anything about, or whose media is unavailable, gets an empty one.
    """
    version = version or assist.served_version()
    instant = assist.instant_predictor()
    out = []
    for task in tasks:
        try:
            out.append(_day_one_task(task, plan, assist, instant, fetch, sample_fps, version))
        except MediaError as exc:
            _failed(on_failure, task, exc)
            out.append(empty_prediction(version))
    return out


def _day_one_task(
    task: dict[str, Any],
    plan: ConfigPlan,
    assist: Any,
    instant: Any,
    fetch: Fetch,
    sample_fps: float | None,
    version: str,
) -> dict[str, Any]:
    answered, score, result = False, 1.0, []
    if plan.image_controls:
        key = plan.image_controls[0].value_key
        url = _task_value(task, key, "image")
        image = load_image(fetch(url, task.get("id")), url)
        fp = instant.predict([image])[0] if instant is not None else None
        mask = conf = None
        if fp is not None:
            mask, conf, score, answered = fp.mask, fp.confidence, fp.score, True
        target = task_target(task, plan)  # where the webhook stores this frame's labels
        if target.frame is not None:
            prop = assist.propagated(target.video, target.frame, image)
            if prop is not None:
                mask, conf = prop["mask"], prop["confidence"]
                score, answered = prop["frame"].confidence, True
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
        fps, count, _ = _decode_video(url, path)
        timeline = assist.phase_timeline(task_target(task, plan).video)
        segments, probs, indices, cvs = None, None, None, None
        if timeline is not None:
            segments, probs, indices = timeline["segments"], timeline["probs"], timeline["indices"]
            cvs, answered = timeline["cvs"], True
        elif instant is not None and instant.heads.has_phase:
            vp = _decode_video(url, path, lambda: instant.predict_video(url, sample_fps))[2]
            segments, probs, indices = vp.segments, vp.phase_timeline_probs, vp.indices
            cvs = vp.cvs_probs if instant.heads.has_cvs else None
            answered = True
        result += video_regions(plan.video_controls, task, fps, count, segments, probs, indices, cvs)
    if not answered:
        return empty_prediction(version)
    return {"model_version": version, "score": _r(score), "result": result}


def _decode_video(url: str, path: Path, run: Callable[[], Any] | None = None) -> tuple[float, int, Any]:
    """``(fps, frame count, run())`` of a fetched video; a file that does not decode is a MediaError (and
    leaves the media cache, so that a fixed file is fetched again rather than refused from the cache)."""
    from surgenet_assist.core.video import open_video

    try:
        with open_video(path) as video:
            fps, count = float(video.fps), int(video.frame_count)
        return fps, count, run() if run is not None else None
    except Exception as exc:  # noqa: BLE001 - VideoReadError and decoder failures
        discard_if_cached(path)
        raise MediaError(
            f"cannot decode video {url}: {getattr(exc, 'message', exc)}",
            url=url,
            hint="check that the file is a complete, supported video",
        ) from None


def prefetched(fetch: Fetch, tasks: list[dict[str, Any]], keys: Iterable[str]) -> Fetch:
    """Download every task's media now and return a ``fetch`` that answers from what was found.

    The backend runs a request in two steps: media first, holding no compute slot (a task whose server
    trickles bytes waits out its own deadline while other requests' models run), then the model under the
    process's compute gate (``BackendServices.compute``). Each URL is fetched once; a failure is remembered
    and raised again when the model step asks, so a slow or refused URL never costs its deadline twice."""
    answers: dict[tuple[str, Any], Path | MediaError] = {}
    for task in tasks:
        data = task.get("data")
        if not isinstance(data, dict):
            continue
        for key in keys:
            url = data.get(key)
            if isinstance(url, str) and url and (url, task.get("id")) not in answers:
                try:
                    answers[(url, task.get("id"))] = fetch(url, task.get("id"))
                except MediaError as exc:
                    answers[(url, task.get("id"))] = exc

    def answer(url: str, task_id: Any = None) -> Path:
        found = answers.get((url, task_id))
        if found is None:
            return fetch(url, task_id)
        if isinstance(found, MediaError):
            raise found
        return found

    return answer
