"""Label Studio webhooks -> the label store (through core's translator) and the training queue.

Two modes, chosen by whether the backend has its own Label Studio connection (``LABEL_STUDIO_URL`` and
``LABEL_STUDIO_API_KEY``):

* **verified** (with a connection): a delivery is only a notification. Each annotation, task and project
  it names is re-read from Label Studio's API with the backend's token before anything is written, and a
  delete is applied only when Label Studio says the object is gone. A forged request can therefore neither
  write nor delete a label, and ``/webhook`` needs no Basic Auth (Label Studio cannot send any: the webhook
  it creates for an ML backend has no headers).
* **trusting** (without): the body is applied as it is; with Basic Auth on, ``/webhook`` then requires it
  like every other route, so Label Studio's deliveries are refused and ``surgenet-assist ls sync`` is the way
  labels arrive.

Events: ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATIONS_CREATED`` (bulk, from "create
annotations from predictions"), ``ANNOTATIONS_DELETED``, ``TASKS_DELETED`` (deleting tasks deletes their
annotations without an annotation event) and ``START_TRAINING`` (one queued training run per store project;
training never runs inside the request). Each Label Studio project writes into its own store project
(``label-studio-<id>``, :func:`~surgenet_assist.core.formats.label_studio.store_project_name`). Anything else
answers ``200 {"status": "ignored"}``. Webhooks are never retried by Label Studio: ``ls sync`` repairs what
a lost delivery missed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from surgenet_assist.core.errors import DatasetFormatError, SurgenetAssistError
from surgenet_assist.core.formats.label_studio import ls_project_id, store_project_name
from surgenet_assist.core.label_studio_sync import (
    ANNOTATION_EVENTS,
    DELETE_EVENTS,
    TASK_DELETE_EVENTS,
    WEBHOOK_HINT,
    apply_annotation,
    ingest_webhook,
    tombstone_ls_labels,
    webhook_annotations,
    webhook_ids,
)
from surgenet_assist.core.schema import LabelSchema

log = logging.getLogger("surgenet_assist.backend")
HANDLED = ANNOTATION_EVENTS + DELETE_EVENTS + TASK_DELETE_EVENTS
CONFIG_TTL_S = 60.0


class WebhookError(SurgenetAssistError, ValueError):
    """A webhook body that cannot be ingested (a 400 for the sender)."""


class WebhookHandler:
    """Applies webhook events to a :class:`~surgenet_assist.core.store.LabelStore`."""

    def __init__(
        self,
        store: Any,
        schema: LabelSchema,
        store_project: str | None = None,
        *,
        ls_api: Any = None,
    ) -> None:
        self.store = store
        self.schema = schema
        self.store_project = store_project  # an override: every Label Studio project into this one
        self.api = ls_api  # a LabelStudioAPI: verified mode
        self._configs: dict[int, tuple[float, str | None]] = {}

    @property
    def verifies(self) -> bool:
        return self.api is not None

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one webhook."""
        action = body.get("action")
        if not isinstance(action, str):
            raise WebhookError("webhook body has no 'action'", WEBHOOK_HINT)
        if action != "START_TRAINING" and action not in HANDLED:
            return 200, {"status": "ignored", "action": action}
        if self.store is None:
            detail, hint = "no label store configured", "start with --db URL"
            return 503, {"status": "error", "detail": detail, "hint": hint}
        if action == "START_TRAINING":
            return self._queue_training(body)
        try:
            result = self._verified(action, body) if self.verifies else self._trusted(action, body)
        except SurgenetAssistError as exc:  # the app answers 400/422; say so in our log too
            log.warning("%s refused: %s (fix: %s)", action, exc.message, exc.hint)
            if isinstance(exc, DatasetFormatError):  # the body's shape, not a label: a 400
                raise WebhookError(exc.message, exc.hint) from None
            raise
        warnings = [w for a in result.get("annotations", []) for w in a.pop("skipped", [])]
        warnings += result.pop("warnings", [])
        for reason in warnings:
            log.warning("%s: %s", action, reason)
        return 200, {"status": "ok", **result, "warnings": warnings}

    # --- trusting: the body as it is ---------------------------------------------------------------------
    def _trusted(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        project = store_project_name(body.get("project"), self.store_project)
        result = ingest_webhook(self.store, body, project=project, schema=self.schema)
        return {**result, "store_project": project, "verified": False}

    # --- verified: re-read from Label Studio -------------------------------------------------------------
    def _verified(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"action": action, "verified": True, "tombstones": 0, "warnings": []}
        if action in ANNOTATION_EVENTS:
            out["annotations"] = []
            for ann, _task in webhook_annotations(body):  # validates the shape; the content is re-read
                ann_id = webhook_ids({"action": action, "annotation": ann}, "annotation")[0]
                out["annotations"].append(self._reread_annotation(ann_id, out))
            return out
        if action in DELETE_EVENTS:
            key = "annotations" if action == "ANNOTATIONS_DELETED" else "annotation"
            kind, exists = "annotation", self.api.annotation
        else:  # TASKS_DELETED
            key, kind, exists = "tasks", "task", self.api.task
        ids = webhook_ids(body, key)
        gone = [i for i in ids if exists(i) is None]  # a delete counts only when Label Studio agrees
        for i in sorted(set(ids) - set(gone)):
            out["warnings"].append(f"{kind} {i} still exists in Label Studio: delete not applied")
        project = store_project_name(body.get("project"), self.store_project)
        ids_of = {"annotation_ids": gone} if kind == "annotation" else {"task_ids": gone}
        out["tombstones"] = tombstone_ls_labels(self.store, project=project, **ids_of)
        return out

    def _reread_annotation(self, ann_id: int, out: dict[str, Any]) -> dict[str, Any]:
        current = self.api.annotation(ann_id)
        task = self.api.task(current["task"]) if current is not None else None
        if current is None or task is None:  # gone since the event was sent: make the store agree
            out["tombstones"] += self._tombstone_everywhere(ann_id)
            return {"annotation": ann_id, "labels": {}, "gone": True}
        pid = ls_project_id(task.get("project") or current.get("project"))
        project = store_project_name(pid, self.store_project)
        result = apply_annotation(
            self.store, current, task, label_config=self._config(pid), project=project, schema=self.schema
        )
        return {**result, "store_project": project}

    def _tombstone_everywhere(self, ann_id: int) -> int:
        """An annotation that no longer exists: tombstone it in whichever store project holds it."""
        projects = [self.store_project] if self.store_project else self.store.projects()
        return sum(tombstone_ls_labels(self.store, annotation_ids=[ann_id], project=p) for p in projects)

    def _config(self, project_id: int | None) -> str | None:
        """The project's labeling config, cached for a minute (it rarely changes; re-read after that)."""
        if project_id is None:
            return None
        now = time.monotonic()
        cached = self._configs.get(project_id)
        if cached is None or now - cached[0] > CONFIG_TTL_S:
            project = self.api.project(project_id) or {}
            cached = self._configs[project_id] = (now, project.get("label_config"))
        return cached[1]

    # --- training ------------------------------------------------------------------------------------------
    def _queue_training(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        pid = ls_project_id(body.get("project"))
        if self.verifies and (pid is None or self.api.project(pid) is None):
            raise WebhookError(
                f"START_TRAINING for project {pid!r}, which Label Studio does not know", WEBHOOK_HINT
            )
        project = store_project_name(pid, self.store_project)
        params = {
            "trigger": "label-studio START_TRAINING",
            "ls_project": pid,
            "store_project": project,
            "label_version": self.store.label_version(),
        }
        # one transaction: never two queued runs of one project; the trainer claims it for that project
        run_id, added = self.store.queue_training_run(params, project=project)
        if not added:
            return 200, {"status": "queued", "training_run": run_id, "already_queued": True}
        log.info("training cycle queued (training_runs.id=%s) for Label Studio project %s", run_id, pid)
        return 201, {"status": "queued", "training_run": run_id, "store_project": project}
