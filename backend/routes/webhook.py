"""``POST /webhook``: Label Studio's annotation and task events into the label store; ``START_TRAINING``
queues a training cycle.

Who may call it:

* Label Studio's webhook deliveries (annotation, task and project events) need the secret header
  ``X-Surgenet-Webhook-Secret`` when ``SURGENET_ASSIST_WEBHOOK_SECRET`` is set (``ls setup-project`` puts it
  on the project's webhook), or the backend's Basic Auth (an operator's script). With neither configured the
  route is open, like every other route of such a backend (a closed network or local use only).
* ``START_TRAINING`` comes from Label Studio's ML connector (``ml/api_connector.py``), which sends the
  backend's Basic Auth and not the webhook's headers: it needs Basic Auth, and is open only where nothing at
  all is configured.

What an unauthenticated caller can make it do, where credentials are configured: nothing but a 401 (the body
is not even parsed). What an authenticated one can: queue work for a *connected* project only (never create a
store project), at most ``SURGENET_ASSIST_WEBHOOK_MAX_IDS`` ids a delivery, at most
``SURGENET_ASSIST_WEBHOOK_BACKLOG`` deliveries waiting (then 503); with a Label Studio connection, write and
delete only what Label Studio's project holds (``backend/webhooks.py``).
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, jsonify, request

from ..http import ApiError, body_json, credentials_ok, json_error
from ..webhooks import SECRET_HEADER, WebhookError, WebhookRefused

bp = Blueprint("webhook", __name__)


def secret_ok(sent: str | None, secret: str) -> bool:
    """Whether the header value equals the secret: compared as bytes in constant time (a header value is
    Latin-1 in WSGI; one with other characters is a wrong secret, not a crash)."""
    if sent is None:
        return False
    return hmac.compare_digest(sent.encode("latin-1", errors="replace"), secret.encode("utf-8"))


def sender(settings) -> str | None:  # noqa: ANN001 - BackendSettings
    """How this delivery is authenticated: ``secret``, ``basic``, ``open`` (nothing configured), or None."""
    if settings.webhook_secret and secret_ok(request.headers.get(SECRET_HEADER), settings.webhook_secret):
        return "secret"
    if settings.basic_auth_user and credentials_ok():
        return "basic"
    if not settings.webhook_secret and not settings.basic_auth_user:
        return "open"
    return None


def _refused_unauthenticated(settings, what: str) -> Response:  # noqa: ANN001 - BackendSettings
    if what == "START_TRAINING":
        hint = (
            "START_TRAINING comes from Label Studio's ML connector, which sends the backend's Basic Auth and "
            "not the webhook's header: set BASIC_AUTH_USER/BASIC_AUTH_PASS and enter them in Label Studio's "
            "model settings"
        )
    elif settings.webhook_secret:
        hint = (
            f"Label Studio's webhook must carry the header {SECRET_HEADER}: run `surgenet-assist ls "
            "setup-project --project ID` with the backend's SURGENET_ASSIST_WEBHOOK_SECRET"
        )
    else:
        hint = (
            "Label Studio's webhooks carry no Basic Auth: set SURGENET_ASSIST_WEBHOOK_SECRET on the backend "
            "and run `surgenet-assist ls setup-project --project ID` with it"
        )
    resp = json_error(401, "unauthorized", f"{what}: credentials missing or wrong", hint)
    if settings.basic_auth_user:
        resp.headers["WWW-Authenticate"] = 'Basic realm="surgenet-assist"'
    return resp


@bp.post("/webhook")
def webhook() -> Response:
    svc = current_app.extensions["surgenet"]
    settings, metrics = svc.settings, svc.metrics
    who = sender(settings)
    if who is None:  # refused before the body is even parsed
        metrics.webhooks_refused.labels("unauthenticated").inc()
        return _refused_unauthenticated(settings, "webhook")
    try:
        data = body_json()
    except ApiError:
        metrics.webhooks_refused.labels("bad_webhook").inc()
        raise
    action = data.get("action")
    metrics.count_webhook(action)
    if action == "START_TRAINING" and who not in ("basic", "open"):  # the ML connector's call: Basic Auth
        metrics.webhooks_refused.labels("unauthenticated").inc()
        return _refused_unauthenticated(settings, "START_TRAINING")
    token = svc.media.token_problem if svc.webhooks.verifies else None
    if token is not None:  # every re-read would fail: one clear state, as on /predict (ls sync repairs later)
        metrics.webhooks_refused.labels("label_studio_token").inc()
        raise ApiError("label_studio_token", token.message, token.hint, status=503)
    try:
        status, body = svc.webhooks.accept(data, size=request.content_length or 0)
    except WebhookError as exc:
        metrics.webhooks_refused.labels("bad_webhook").inc()
        raise ApiError("bad_webhook", exc.message, exc.hint) from None
    except WebhookRefused as exc:
        metrics.webhooks_refused.labels(exc.error).inc()
        raise ApiError(exc.error, exc.message, exc.hint, status=exc.status) from None
    resp = jsonify(body)
    resp.status_code = status
    return resp
