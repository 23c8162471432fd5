"""What every route shares: JSON errors, the request body as JSON, the Basic Auth guard, log redaction.

Each route names its own guard where it is declared (``@basic_auth`` or the webhook's own check in
``routes/webhook.py``), so "who may call this?" is answered next to the route, not in a hook far away.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, jsonify, request

log = logging.getLogger("surgenet_assist.backend")

_SECRET = re.compile(r"((?:Token|Bearer)\s+|access_token['\"]?\s*[:=]\s*['\"]?)[A-Za-z0-9._\-]+", re.I)
_URL_SECRET = re.compile(
    r"([?&](?:token|access_token|api_key|key|sig|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token|x-goog-signature|x-goog-credential)=)[^&\s]+",
    re.I,
)


class RedactTokens(logging.Filter):
    """Scrubs tokens from log records (``Token x``, ``Bearer x``, ``access_token=x``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if _SECRET.search(msg):
            record.msg, record.args = _SECRET.sub(r"\1***", msg), None
        return True


def redact_tokens_in_logs() -> None:
    """The root logger and its handlers scrub tokens; adds the filter once, however many apps are built."""
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if not any(isinstance(f, RedactTokens) for f in target.filters):
            target.addFilter(RedactTokens())


def redact_url(text: str | None) -> str | None:
    """A URL (or a message naming one) without query-string secrets (presigned cloud URLs, tokens)."""
    return _URL_SECRET.sub(r"\1***", text) if text else text


class ApiError(Exception):
    """A request the backend refuses: ``status`` with ``{"error", "detail", "hint", ...extra}``."""

    def __init__(
        self, error: str, detail: str, hint: str | None = None, status: int = 400, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.error, self.detail, self.hint, self.status, self.extra = error, detail, hint, status, extra


def json_error(status: int, error: str, detail: str, hint: str | None = None, **extra: Any) -> Response:
    body = {"status": status, "error": error, "detail": detail}
    if hint:
        body["hint"] = hint
    body.update(extra)
    resp = jsonify(body)
    resp.status_code = status
    return resp


JSON_HINT = "send a JSON object, as Label Studio does (Content-Type: application/json)"


def body_json() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong."""
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw or b"null")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, an int of 4,300+ digits
        raise ApiError("malformed_json", f"request body is not valid JSON: {exc}"[:300], JSON_HINT) from None
    if not isinstance(data, dict):
        raise ApiError("malformed_json", "request body must be a JSON object", JSON_HINT)
    return data


def basic_auth_ok(header: str, user: str, password: str) -> bool:
    """True when ``header`` carries exactly these Basic Auth credentials.

    Compared as bytes with :func:`hmac.compare_digest` (constant time, any characters: a user name outside
    ASCII is a wrong password, not a crash)."""
    if not header.startswith("Basic "):
        return False
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    got_user, sep, got_pass = raw.partition(b":")
    if not sep:
        return False
    user_ok = hmac.compare_digest(got_user, user.encode("utf-8"))
    pass_ok = hmac.compare_digest(got_pass, password.encode("utf-8"))
    return user_ok and pass_ok


def unauthorized() -> Response:
    resp = json_error(
        401,
        "unauthorized",
        "basic auth required",
        "set the ML backend's Basic Auth user/password in Label Studio's model settings",
    )
    resp.headers["WWW-Authenticate"] = 'Basic realm="surgenet-assist"'
    return resp


def credentials_ok() -> bool:
    """Whether this request passes the backend's Basic Auth (always, when none is configured)."""
    settings = current_app.extensions["surgenet"].settings
    if not settings.basic_auth_user:
        return True
    return basic_auth_ok(
        request.headers.get("Authorization", ""), settings.basic_auth_user, settings.basic_auth_pass or ""
    )


def basic_auth(view: Callable[..., Any]) -> Callable[..., Any]:
    """Guard: the route needs the backend's Basic Auth when ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` are
    set (Label Studio sends them on ``/setup``, ``/predict``, ``/versions`` and ``START_TRAINING``)."""

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if not credentials_ok():
            return unauthorized()
        return view(*args, **kwargs)

    guarded.guard = "basic_auth"  # type: ignore[attr-defined] - read by tests that list each route's guard
    return guarded
