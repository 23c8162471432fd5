"""``POST /setup``, ``POST /predict`` (batch pre-annotation and Label Studio's interactive mode) and
``GET|POST /versions``.

Who may call them: with Basic Auth configured, only a caller with the credentials (Label Studio sends them
on every call of its ML connector); without it, anyone who reaches the port, so run the backend on a network
only Label Studio reaches (``docs/deploy.md``). What a caller can make them do is bounded per request: the
body size (``SURGENET_ASSIST_MAX_BODY``), the tasks it names, the media behind them (each download bounded
in time and bytes, refused for private addresses and hosts off the allow-list: ``backend/media.py``).
``/setup`` also connects the Label Studio project it names, so that its webhooks are taken: queued, and only
with Basic Auth or once Label Studio confirms the project exists (``backend/webhooks.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.store import is_frame_model

from ..acquisition import apply_queue_scores
from ..config import CVS_CRITERION, CVS_MULTI, PHASE_CHOICE, LabelConfigError, parse_label_config
from ..http import ApiError, basic_auth, body_json, redact_url
from ..interactive import InteractiveError, InteractiveUnavailable, context_regions, interactive_predictions
from ..ls_api import TokenProblem
from ..media import MediaError
from ..metrics import TASK_OF_TYPE
from ..preannotation import held_out_tasks, with_held_out
from ..predictions import ImageTaskModel, VideoTaskModel, day_one_predictions, empty_prediction, prefetched
from ..settings import BackendSettings

log = logging.getLogger("surgenet_assist.backend")

bp = Blueprint("predict", __name__)


@bp.post("/setup")
@basic_auth
def setup() -> Response:
    svc = current_app.extensions["surgenet"]
    data = body_json()
    svc.media.remember_setup(data.get("hostname"), data.get("access_token"))
    # Label Studio connecting the backend connects the project (its webhooks are then taken): on the webhook
    # worker, once Label Studio confirms it, or at once for a caller with Basic Auth (backend/webhooks.py)
    svc.webhooks.connect_later(data.get("project"), authenticated=bool(svc.settings.basic_auth_user))
    served = svc.holder_for(data.get("project")).serving(svc.assist_for(data.get("project")))
    cfg = data.get("schema") or data.get("label_config")
    body: dict[str, Any] = {
        "model_version": served.version,
        "backbone": svc.backbone_info(data.get("project")),  # which backbone clicks and day one use
    }
    if cfg:
        try:
            plan = parse_label_config(cfg, svc.schema)
        except LabelConfigError as exc:
            raise ApiError("bad_label_config", exc.message, exc.hint) from None
        body.update(plan.summary())
        if plan.unknown_labels:
            log.warning(
                "project %s: labels the model does not know (never predicted): %s",
                data.get("project"),
                ", ".join(f"{u['control']}:{u['label']}" for u in plan.unknown_labels),
            )
        if plan.skipped_controls:
            log.info("project %s: controls not filled: %s", data.get("project"), plan.skipped_controls)
    if served.kind == "none":
        body["warning"] = "no trained model yet: predictions are empty; annotations are still stored"
    elif served.kind == "day-one":
        body["warning"] = (
            "no trained model yet: predictions come from label propagation and instant heads "
            "fitted on the labels stored so far"
        )
    return jsonify(body)


@bp.post("/predict")
@basic_auth
def predict() -> Response:
    svc = current_app.extensions["surgenet"]
    data = body_json()
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        raise ApiError(
            "missing_tasks",
            "'tasks' must be a non-empty list of task objects",
            'send {"tasks": [{"id": 1, "data": {"image": "..."}}], "label_config": "<View>..."}',
        )
    cfg = data.get("label_config") or data.get("schema")
    if not cfg:
        raise ApiError("missing_label_config", "'label_config' is missing", "send the project's config")
    try:
        plan = parse_label_config(cfg, svc.schema)
    except LabelConfigError as exc:
        raise ApiError("bad_label_config", exc.message, exc.hint) from None
    try:
        regions = context_regions(data.get("params"), svc.settings.max_prompt_regions)
    except InteractiveError as exc:
        raise ApiError("bad_interactive_context", exc.message, exc.hint) from None
    if regions is not None:
        return _interactive(tasks, plan, regions, data.get("project"))
    if not plan.controls:
        raise ApiError(
            "no_fillable_control",
            "no control in the labeling config can be filled by this model",
            "use BrushLabels/PolygonLabels, CVS or phase Choices on an Image, "
            "or TimelineLabels on a Video "
            "(see `surgenet-assist ls config`)",
            status=422,
            skipped_controls=plan.skipped_controls,
        )
    # decided before predicting: a change meanwhile makes Label Studio ask again
    served = svc.holder_for(data.get("project")).serving(svc.assist_for(data.get("project")))
    store_project = svc.store_project(data.get("project"))
    failed: dict[int, dict[str, Any]] = {}  # position in the batch -> why its prediction is empty
    positions = {id(t): i for i, t in enumerate(tasks)}
    # test and final videos: no pre-annotation unless the team turned it on (backend/preannotation.py)
    held = held_out_tasks(tasks, plan, svc.store, store_project, allowed=svc.settings.preannotate_held_out)
    todo = [t for i, t in enumerate(tasks) if i not in held]

    def on_failure(task: dict[str, Any], exc: MediaError) -> None:
        if positions[id(task)] in failed:
            return  # the same task in the other part of a mixed (image + video) config
        url = redact_url(exc.url)
        log.warning(
            "task %s: media %s unavailable, empty prediction: %s",
            task.get("id"),
            url or "(no URL in the task)",
            redact_url(exc.message),
        )
        svc.metrics.prediction_failures.labels("media").inc()
        failed[positions[id(task)]] = {"task": task.get("id"), "reason": "media", "url": url}

    try:
        # media first, holding no compute slot; then the model under the process's compute gate (only for the
        # tasks that are pre-annotated: a held-out task's media is never fetched)
        fetch = prefetched(svc.fetch, todo, {c.value_key for c in plan.controls})
        if not todo:
            results = []
        else:
            with svc.compute:
                if served.kind == "model":
                    results = predict_tasks(todo, plan, served.predictor, svc.settings, fetch, on_failure)
                elif served.kind == "day-one":
                    fps = svc.settings.video_sample_fps
                    results = day_one_predictions(
                        todo, plan, served.assist, fetch, fps, served.version, on_failure
                    )
                else:
                    results = [empty_prediction(served.version) for _ in todo]
    except LabelConfigError as exc:
        raise ApiError("bad_label_config", exc.message, exc.hint, status=422) from None
    except TokenProblem as exc:
        raise token_unavailable(exc) from None
    results = with_held_out(results, held, served.version)
    failed |= held
    for i in failed:  # a task that failed in one part of a mixed config says nothing at all
        results[i] = empty_prediction(served.version)
    results = apply_queue_scores(results, tasks, svc.store, store_project)  # AL order in LS
    svc.metrics.tasks.inc(len(tasks))
    kinds = {c.name: c.kind for c in plan.controls}
    for res in results:
        for region in res["result"]:
            task_name = TASK_OF_TYPE.get(region["type"])
            if task_name is None:
                kind = kinds.get(region["from_name"])
                task_name = (
                    "phase"
                    if kind == PHASE_CHOICE
                    else "cvs"
                    if kind in (CVS_MULTI, CVS_CRITERION)
                    else "other"
                )
            svc.metrics.predictions.labels(task_name).inc()
    body = {"results": results, "model_version": served.version}
    if failed:
        body["failed"] = [failed[i] for i in sorted(failed)]  # Label Studio reads only "results"
    return jsonify(body)


def _interactive(
    tasks: list[dict[str, Any]], plan: Any, regions: list[dict[str, Any]], ls_project: Any
) -> Response:
    """Label Studio's interactive mode: the clicked object's brush region (none for an empty context), one
    prediction per task, stamped with the click engine's version (not the served model's: a different model
    answers). The context is checked before the engine is built or the image fetched."""
    svc = current_app.extensions["surgenet"]
    store_project = svc.store_project(ls_project)
    try:
        engine = lambda: svc.click_engine(ls_project)  # noqa: E731 - built only for a usable context
        results, version = interactive_predictions(
            tasks, plan, regions, engine, svc.fetch, store_project, compute=svc.compute
        )
    except TokenProblem as exc:
        raise token_unavailable(exc) from None
    except SurgenetAssistError as exc:
        error, status = (
            ("interactive_unavailable", 503)
            if isinstance(exc, InteractiveUnavailable)
            else ("media_unavailable", 422)
            if isinstance(exc, MediaError)
            else ("bad_interactive_context", 400)  # InteractiveError, or the engine's PromptError
        )
        detail = redact_url(exc.public if isinstance(exc, MediaError) else exc.message) or exc.message
        # Label Studio shows the annotator only "<status> Client Error"; the log says what and how to fix
        log.warning("interactive /predict refused (%s): %s Fix: %s", error, redact_url(exc.message), exc.hint)
        raise ApiError(error, detail, exc.hint, status=status) from None
    svc.metrics.tasks.inc(len(tasks))
    for res in results:
        for _region in res["result"]:
            svc.metrics.predictions.labels("interactive").inc()
    return jsonify({"results": results, "model_version": version})


@bp.get("/versions")
@bp.post("/versions")
@basic_auth
def versions() -> Response:
    svc = current_app.extensions["surgenet"]
    rows = []
    if svc.store is not None:
        try:
            rows = svc.store.model_versions()
        except SurgenetAssistError as exc:
            log.warning("registry not readable: %s", exc.message)
    # model choices are whole-frame models: a click head (task "interactive") cannot pre-annotate a task
    names = [r["version"] for r in rows if is_frame_model(r)]
    holder = svc.holder
    if holder.version not in names:
        names.append(holder.version)
    return jsonify(
        {
            "versions": names,
            "current": holder.version,
            "registry": [
                {k: (str(v) if k.endswith("_at") else v) for k, v in r.items() if k != "bundle_hash"}
                for r in rows
            ],
        }
    )


def predict_tasks(
    tasks: list[dict[str, Any]],
    plan: Any,
    predictor: Any,
    settings: BackendSettings,
    fetch: Callable,
    on_failure: Callable[[dict[str, Any], MediaError], None],
) -> list[dict[str, Any]]:
    """One prediction per task, merging image and video controls of a mixed config."""
    merged = [{"model_version": predictor.model_version, "score": 1.0, "result": []} for _ in tasks]
    parts = []
    if plan.image_controls:
        parts.append(ImageTaskModel(predictor).predict(tasks, plan, fetch, on_failure))
    if plan.video_controls:
        video = VideoTaskModel(predictor, settings.video_sample_fps)
        parts.append(video.predict(tasks, plan, fetch, on_failure))
    for part in parts:
        for m, p in zip(merged, part, strict=True):
            m["result"] += p["result"]
            m["score"] = min(m["score"], p["score"])
    return merged


def token_unavailable(exc: TokenProblem) -> ApiError:
    """Label Studio refuses the backend's token (or cannot be reached to refresh it): a 503 for the whole
    request, not empty predictions. Label Studio stores nothing for a failed request and asks again once the
    token is fixed; an empty prediction would be stored under the served version and never asked for again."""
    log.warning("/predict refused: %s Fix: %s", exc.message, exc.hint)
    return ApiError("label_studio_token", exc.message, exc.hint, status=503)
