"""Label Studio webhooks -> the label store (human labels, provenance, revisions) and the training queue.

* ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: every supported region of the annotation becomes one label
  per task (segmentation mask, phase or phase segments, CVS) recorded with ``source="label-studio"``, the LS
  task/annotation ids, the author and LS's ``updated_at``. The label's identity is
  ``ls:<project>:<annotation>:<task>``, so an update appends a revision, a redelivery is a no-op (the store
  is idempotent on content + timestamp), and a task removed from the annotation gets a tombstone.
* ``ANNOTATION_DELETED``: tombstones for every label of that annotation.
* ``START_TRAINING``: one ``training_runs`` row with ``status="queued"`` (the trainer picks it up); no second
  row while one is still queued. Returns at once: training never runs inside the request.

Which frame a label belongs to: image tasks may carry ``source_video`` and ``frame_index`` in their data
(``ls setup-project`` writes them); otherwise the image URL itself is the "video" and the frame is 0.
Video tasks use the video URL, and timeline ranges (1-based inclusive) become 0-based inclusive segments.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from surgenet_assist.core.encoders import brush_rle_to_mask
from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.schema import LabelSchema

from .config import CVS_CRITERION, CVS_MULTI, PHASE_CHOICE, ConfigPlan, LabelConfigError, parse_label_config

log = logging.getLogger("surgenet_assist.backend")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
SOURCE = "label-studio"
TASKS = ("segmentation", "phase", "cvs")


class WebhookError(ValueError):
    """A webhook body that cannot be ingested (a 4xx for the sender)."""


def _author(annotation: dict[str, Any]) -> str | None:
    by = annotation.get("completed_by")
    if isinstance(by, dict):
        return str(by.get("email") or by.get("id"))
    if by is not None:
        return f"ls-user:{by}"
    return annotation.get("created_username") or None


def _media(task: dict[str, Any], plan: ConfigPlan | None) -> tuple[str, int, str]:
    """(video path, frame index, object kind) of a task."""
    data = task.get("data") or {}
    keys = [c.value_key for c in plan.controls] if plan else []
    keys += ["video", "image"]
    for key in keys:
        if isinstance(data.get(key), str) and data[key]:
            kind = (
                "video"
                if plan and any(c.value_key == key and c.object_tag == "video" for c in plan.controls)
                else ("video" if key == "video" else "image")
            )
            if kind == "image" and data.get("source_video"):
                return str(data["source_video"]), int(data.get("frame_index") or 0), kind
            return data[key], 0, kind
    raise WebhookError(f"task {task.get('id')} has no image or video in its data (keys {sorted(data)[:10]})")


def annotation_labels(
    annotation: dict[str, Any], plan: ConfigPlan | None, schema: LabelSchema
) -> tuple[dict[str, Any], list[str]]:
    """Regions of one LS annotation -> ``{task: payload value}`` for the store, plus warnings."""
    warnings: list[str] = []
    choices_kind = {c.name: c for c in plan.controls} if plan else {}
    mask: np.ndarray | None = None
    phase: str | None = None
    segments: list[tuple[int, int, str]] = []
    cvs: list[float] | None = None
    for region in annotation.get("result") or []:
        if not isinstance(region, dict):
            continue
        rtype = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        try:
            if rtype in ("brushlabels", "polygonlabels"):
                label = (value.get(rtype) or [None])[0]
                if label is None or not schema.has_class(label):
                    warnings.append(f"unknown segmentation label {label!r} ignored")
                    continue
                h, w = int(region["original_height"]), int(region["original_width"])
                if mask is None:
                    mask = np.full((h, w), schema.ignore_index, dtype=np.uint8)
                if (h, w) != mask.shape:
                    warnings.append(
                        f"region {region.get('id')} is {w}x{h}, others {mask.shape[1]}x{mask.shape[0]}"
                    )
                    continue
                cid = schema.class_id(label)
                if rtype == "brushlabels":
                    mask[brush_rle_to_mask(value["rle"], h, w) > 127] = cid
                else:
                    pts = np.array([[x / 100 * w, y / 100 * h] for x, y in value["points"]], dtype=np.float32)
                    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], int(cid))
            elif rtype == "timelinelabels":
                label = (value.get("timelinelabels") or [None])[0]
                if label is None or not schema.has_phase(label):
                    warnings.append(f"unknown phase {label!r} ignored")
                    continue
                for rng in value.get("ranges") or []:
                    segments.append((int(rng["start"]) - 1, int(rng["end"]) - 1, label))
            elif rtype == "choices":
                ctrl = choices_kind.get(region.get("from_name"))
                chosen = [str(c) for c in value.get("choices") or []]
                kind = ctrl.kind if ctrl else None
                if kind is None:  # no config at hand: guess from the values
                    if chosen and all(schema.has_phase(c) for c in chosen):
                        kind = PHASE_CHOICE
                    elif chosen and all(_is_cvs(schema, c) for c in chosen):
                        kind = CVS_MULTI
                if kind == PHASE_CHOICE and chosen:
                    phase = chosen[0]
                elif kind == CVS_MULTI:
                    cvs = cvs or [0.0] * schema.num_cvs
                    for c in chosen:
                        cvs[schema.cvs_id(c)] = 1.0
                elif kind == CVS_CRITERION and ctrl is not None and ctrl.yes_no is not None:
                    cvs = cvs or [0.0] * schema.num_cvs
                    cvs[int(ctrl.criterion or 0)] = 1.0 if ctrl.yes_no[0] in chosen else 0.0
                else:
                    warnings.append(f"choices {region.get('from_name')!r} = {chosen} not stored")
        except (KeyError, TypeError, ValueError, SurgenetAssistError) as exc:
            warnings.append(f"region {region.get('id')} ({rtype}) skipped: {getattr(exc, 'message', exc)}")
    labels: dict[str, Any] = {}
    if mask is not None:
        labels["segmentation"] = mask
    if segments:
        segments.sort()
        labels["phase"] = {"segments": segments}
    elif phase is not None:
        labels["phase"] = phase
    if cvs is not None:
        labels["cvs"] = cvs
    return labels, warnings


def _is_cvs(schema: LabelSchema, name: str) -> bool:
    try:
        schema.cvs_id(name)
        return True
    except SurgenetAssistError:
        return False


class WebhookHandler:
    """Applies webhook events to a :class:`~surgenet_assist.core.store.LabelStore`."""

    def __init__(self, store: Any, schema: LabelSchema, store_project: str | None = None) -> None:
        self.store = store
        self.schema = schema
        self.store_project = store_project  # None: the store's default project (what training reads)

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one webhook."""
        action = body.get("action")
        if not isinstance(action, str):
            raise WebhookError("webhook body has no 'action'")
        if action in ANNOTATION_EVENTS or action == "ANNOTATION_DELETED" or action == "ANNOTATIONS_DELETED":
            if self.store is None:
                return 503, {
                    "status": "error",
                    "detail": "no label store configured",
                    "hint": "start with --db URL",
                }
            if action == "ANNOTATIONS_DELETED":
                ids = [a.get("id") for a in body.get("annotations") or [] if isinstance(a, dict)]
                n = sum(self.store.delete_ls_annotation(int(i)) for i in ids if i is not None)
                return 200, {"status": "ok", "action": action, "tombstones": n}
            return self._annotation(action, body)
        if action == "START_TRAINING":
            return self._queue_training(body)
        return 200, {"status": "ignored", "action": action}

    def _annotation(self, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        annotation, task, project = body.get("annotation"), body.get("task"), body.get("project") or {}
        if not isinstance(annotation, dict) or annotation.get("id") is None:
            raise WebhookError(f"{action} without an 'annotation' object with an id")
        ann_id = int(annotation["id"])
        if action == "ANNOTATION_DELETED":
            n = self.store.delete_ls_annotation(ann_id, updated_at=annotation.get("updated_at"))
            return 200, {"status": "ok", "action": action, "annotation": ann_id, "tombstones": n}
        if not isinstance(task, dict):
            raise WebhookError(f"{action} without a 'task' object")
        plan = None
        if isinstance(project.get("label_config"), str):
            try:
                plan = parse_label_config(project["label_config"], self.schema)
            except LabelConfigError:
                plan = None
        if annotation.get("was_cancelled"):
            return 200, {
                "status": "ignored",
                "action": action,
                "reason": "annotation was skipped (cancelled)",
            }
        path, frame, _kind = _media(task, plan)
        pname = self.store_project
        labels, warnings = annotation_labels(annotation, plan, self.schema)
        for w in warnings:
            log.warning("annotation %s: %s", ann_id, w)
        video_id = self.store.add_video(path, project=pname)
        recorded: dict[str, Any] = {}
        updated_at = annotation.get("updated_at") or annotation.get("created_at")
        common = {
            "source": SOURCE,
            "author": _author(annotation),
            "ls_annotation_id": ann_id,
            "updated_at": updated_at,
            "project": pname,
        }
        for task_name, value in labels.items():
            start, end = frame, None
            if task_name == "phase" and isinstance(value, dict):
                start, end = value["segments"][0][0], max(s[1] for s in value["segments"])
            res = self.store.record_annotation(
                video_id,
                start,
                task_name,
                value,
                frame_end=end,
                ls_task_id=task.get("id"),
                key=f"ls:{project.get('id')}:{ann_id}:{task_name}",
                **common,
            )
            recorded[task_name] = {
                "annotation_id": res.annotation_id,
                "revision": res.revision,
                "created": res.created,
            }
        if action == "ANNOTATION_UPDATED":
            for task_name in TASKS:
                if task_name not in labels:
                    res = self.store.delete_annotation(
                        video_id,
                        frame,
                        task_name,
                        key=f"ls:{project.get('id')}:{ann_id}:{task_name}",
                        **common,
                    )
                    if res is not None and res.created:
                        recorded[task_name] = {
                            "annotation_id": res.annotation_id,
                            "revision": res.revision,
                            "deleted": True,
                        }
        return 200, {
            "status": "ok",
            "action": action,
            "annotation": ann_id,
            "labels": recorded,
            "warnings": warnings,
        }

    def _queue_training(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.store is None:
            return 503, {"status": "error", "detail": "no label store configured, cannot queue training"}
        project = body.get("project") or {}
        queued = [r for r in self.store.training_runs() if r.get("status") == "queued"]
        if queued:
            return 200, {"status": "queued", "training_run": queued[-1]["id"], "already_queued": True}
        run_id = self.store.record_training_run(
            status="queued",
            params={
                "trigger": "label-studio START_TRAINING",
                "ls_project": project.get("id"),
                "label_version": self.store.label_version(),
            },
        )
        log.info(
            "training cycle queued (training_runs.id=%s) for Label Studio project %s",
            run_id,
            project.get("id"),
        )
        return 201, {"status": "queued", "training_run": run_id}
