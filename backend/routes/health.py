"""``GET /health`` (and ``/``) and ``GET /metrics``.

Unauthenticated callers may read ``/health``: it says whether the backend is up, which model serves and
which webhook mode is active, whether Label Studio holds each connected project's webhook
(``webhook_check``: state, why and the fix, no address) and how full the webhook queue is; no label, no path,
no secret. It never waits on the model, the store or Label Studio, so it answers within Label Studio's 1 s
whatever else runs. ``/metrics`` needs Basic Auth when it is
configured (its counters describe traffic).

While Label Studio refuses the backend's token (or cannot be reached to refresh it), ``status`` is
``DEGRADED`` and ``label_studio_token`` says what to fix (no token, no address).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from ..http import basic_auth

bp = Blueprint("health", __name__)


@bp.get("/")
@bp.get("/health")
def health() -> Response:
    svc = current_app.extensions["surgenet"]
    holder = svc.holder
    holder.poll()
    body = {
        "status": "UP",
        "model_class": "SurgeNetAssist",
        "model_version": holder.version,
        "model_loaded": holder.predictor is not None,
        "store": svc.store is not None,
        "webhooks": svc.webhook_mode,
        "backbone": svc.backbone_info(),  # which backbone computes click and day-one features
        # computed at start and when a project connects, never here: Label Studio is not called
        "webhook_check": svc.webhooks.checks.summary() if svc.webhooks.checks is not None else None,
        "webhook_backlog": svc.webhooks.queue.snapshot(),
    }
    if holder.predictor is None:
        body["warning"] = "no trained model yet: predictions are empty; annotations are still stored"
    if holder.problem:
        body["problem"] = holder.problem
    token = svc.media.token_problem  # a state read; a stale one is re-checked in the background
    if token is not None:  # media and webhook verification fail until it is fixed: not UP
        body["status"] = "DEGRADED"
        body["label_studio_token"] = {"problem": token.message, "fix": token.hint}
    return jsonify(body)


@bp.get("/metrics")
@basic_auth
def metrics() -> Response:
    svc = current_app.extensions["surgenet"]
    svc.metrics.model_loaded.set(1 if svc.holder.predictor is not None else 0)
    return Response(svc.metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")
