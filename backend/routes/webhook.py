"""``POST /webhook``: Label Studio's annotation and task events into the label store; ``START_TRAINING``
queues a training cycle.

Who may call it: with Basic Auth configured and no Label Studio connection, only a caller with the
credentials (Label Studio's own deliveries carry none: ``ls sync`` brings labels in). With a Label Studio
connection every delivery is verified against Label Studio's API before anything is written (see
``backend/webhooks.py``).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from surgenet_assist.core.errors import SurgenetAssistError

from ..http import ApiError, body_json, credentials_ok, unauthorized
from ..webhooks import WebhookError

bp = Blueprint("webhook", __name__)


@bp.post("/webhook")
def webhook() -> Response:
    svc = current_app.extensions["surgenet"]
    if not svc.webhooks.verifies and not credentials_ok():
        return unauthorized()
    data = body_json()
    try:
        status, body = svc.webhooks.handle(data)
    except WebhookError as exc:
        raise ApiError("bad_webhook", exc.message, exc.hint) from None
    except SurgenetAssistError as exc:
        raise ApiError("label_rejected", exc.message, exc.hint, status=422) from None
    svc.metrics.webhooks.labels(str(data.get("action"))).inc()
    if status == 200 and any(a.get("labels") for a in body.get("annotations", [])):
        for project in {a.get("store_project") for a in body["annotations"]}:
            project_assist = svc.assist_in(project)
            if project_assist is not None:
                project_assist.label_arrived()  # refit instant heads on the worker thread; never waits
    resp = jsonify(body)
    resp.status_code = status
    return resp
