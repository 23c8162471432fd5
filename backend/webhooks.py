"""Label Studio webhooks -> the label store (through core's translator) and the training queue.

* ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATION_DELETED`` / ``ANNOTATIONS_DELETED``:
  :func:`surgenet_assist.core.formats.label_studio.ingest_webhook` reads the annotation with the project's
  labeling config and writes its labels (identity, author, tombstones: see that module). A label the schema
  does not know refuses the annotation (422 ``label_rejected``, naming the label and the fix).
* ``START_TRAINING``: one ``training_runs`` row with ``status="queued"`` (the trainer picks it up); no second
  row while one is still queued. Returns at once: training never runs inside the request.
* Anything else: ``200 {"status": "ignored"}``.
"""

from __future__ import annotations

import logging
from typing import Any

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.formats.label_studio import ANNOTATION_EVENTS, DELETE_EVENTS, ingest_webhook
from surgenet_assist.core.schema import LabelSchema

log = logging.getLogger("surgenet_assist.backend")


class WebhookError(SurgenetAssistError, ValueError):
    """A webhook body that cannot be ingested (a 400 for the sender)."""


WEBHOOK_HINT = "send Label Studio's webhook body unchanged (see docs/http-api.md)"


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
            raise WebhookError("webhook body has no 'action'", WEBHOOK_HINT)
        if action == "START_TRAINING":
            return self._queue_training(body)
        if action not in ANNOTATION_EVENTS + DELETE_EVENTS:
            return 200, {"status": "ignored", "action": action}
        if self.store is None:
            return 503, {
                "status": "error",
                "detail": "no label store configured",
                "hint": "start with --db URL",
            }
        if action != "ANNOTATIONS_DELETED" and not isinstance(body.get("annotation"), dict):
            raise WebhookError(f"{action} without an 'annotation' object", WEBHOOK_HINT)
        if action in ANNOTATION_EVENTS and not isinstance(body.get("task"), dict):
            raise WebhookError(f"{action} without a 'task' object", WEBHOOK_HINT)
        try:
            result = ingest_webhook(self.store, body, project=self.store_project, schema=self.schema)
        except SurgenetAssistError as exc:  # the app answers 422 label_rejected; say so in our log too
            log.warning("%s refused: %s (fix: %s)", action, exc.message, exc.hint)
            raise
        for reason in result.get("skipped", []):
            log.warning("annotation %s: %s", result.get("annotation"), reason)
        status = "ignored" if result.pop("ignored", False) else "ok"
        result["warnings"] = result.pop("skipped", [])
        return 200, {"status": status, **result}

    def _queue_training(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.store is None:
            return 503, {"status": "error", "detail": "no label store configured, cannot queue training"}
        project = body.get("project") or {}
        params = {
            "trigger": "label-studio START_TRAINING",
            "ls_project": project.get("id"),
            "label_version": self.store.label_version(),
        }
        run_id, added = self.store.queue_training_run(params)  # one transaction: never two queued runs
        if not added:
            return 200, {"status": "queued", "training_run": run_id, "already_queued": True}
        log.info(
            "training cycle queued (training_runs.id=%s) for Label Studio project %s",
            run_id,
            project.get("id"),
        )
        return 201, {"status": "queued", "training_run": run_id}
