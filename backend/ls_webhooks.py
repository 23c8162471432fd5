"""The webhook Label Studio holds for a project: is it there, does it carry our secret, and (``ls
setup-project``) create or repair it.

Label Studio creates a webhook to ``<backend>/webhook`` when an ML backend is connected (``ml/models.py``
``create_ml_webhook``), **without headers**, and skips it *silently* when its URL check fails: with
``SSRF_PROTECTION_ENABLED`` on (its default) for a private or loopback address, and, whatever the setting, for
a host name without a dot (Django's URL validator: the compose service name ``backend`` fails). Nothing in
Label Studio's UI says so; annotations then reach the store only through ``ls sync``. So ``ls setup-project``
and the backend at start look (``GET /api/webhooks/?project=N``) and say why one is missing.

Decision on the auto-created webhook: ``ls setup-project`` keeps it and adds the secret header
(``X-Surgenet-Webhook-Secret``) to it, or creates one with the header before Label Studio would, and deletes
other webhooks of the project to the same URL (each would deliver every event again, and a headerless one is
refused every time). A webhook without the header, where the backend has a secret, is reported as
``no_secret``: its deliveries get 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from .ls_api import LabelStudioToolError
from .webhooks import SECRET_HEADER

log = logging.getLogger("surgenet_assist.backend")

OK = "ok"
MAX_CHECKED_PROJECTS = 50  # projects checked at start (two Label Studio calls each, off the request path)
SSRF_FIX = (
    "on the Label Studio server set SSRF_PROTECTION_ENABLED=false (or USE_DEFAULT_BANNED_SUBNETS=false; "
    "ML_BLOCK_LOCAL_IP=false too for the ML backend itself) and restart it"
)
HOST_FIX = (
    "use a host name with a dot (e.g. a network alias backend.internal) or an IP address in --backend-url"
)


@dataclass
class WebhookCheck:
    """What Label Studio holds for one project: ``state`` is ``ok``, ``missing``, ``no_secret``,
    ``wrong_secret``, ``inactive``, ``no_ml_backend``, ``no_project`` or ``error``; ``problem`` and ``fix``
    say what is wrong and what to do (never the secret)."""

    project: int
    state: str
    url: str | None = None
    webhook_id: int | None = None
    problem: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == OK

    def to_dict(self, *, with_address: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if not with_address:  # /health is public: no URL of this backend
            out.pop("url", None)
        return out


def webhook_url(backend_url: str) -> str:
    """Where Label Studio sends a backend's webhooks (as ``create_ml_webhook`` builds it)."""
    return backend_url.rstrip("/") + "/webhook"


def _same_url(url: Any, targets: list[str]) -> bool:
    return str(url or "").rstrip("/") in {t.rstrip("/") for t in targets}


def secret_matches(headers: Any, secret: str) -> bool | None:
    """Whether a webhook's ``headers`` carry ``secret`` under :data:`SECRET_HEADER` (names compared without
    case, values in constant time); None when the header is absent."""
    if not isinstance(headers, dict):
        return None
    values = [v for k, v in headers.items() if str(k).lower() == SECRET_HEADER.lower()]
    if not values:
        return None
    return any(hmac.compare_digest(str(v).encode(), secret.encode()) for v in values)


def why_label_studio_refuses(url: str) -> tuple[str, str]:
    """(reason, fix) for a webhook URL Label Studio would not accept, judged as its checks do."""
    host = urlsplit(url).hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None and host != "localhost" and "." not in host:
        return (
            "its URL check refuses a host name without a dot (such as a compose service name), whatever its "
            "SSRF settings",
            HOST_FIX,
        )
    if ip is None:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0])
        except (OSError, ValueError, IndexError):
            ip = None
    if ip is not None and not ip.is_global:
        return (
            "the URL resolves to a private or loopback address, which it refuses while "
            "SSRF_PROTECTION_ENABLED is on (its default)",
            SSRF_FIX,
        )
    return (
        "it refuses URLs that fail its URL check or, with SSRF_PROTECTION_ENABLED on (its default), resolve "
        "to a private address",
        f"{SSRF_FIX}; or {HOST_FIX}",
    )


def _webhooks(api: Any, project_id: int) -> list[dict[str, Any]] | None:
    try:
        hooks = api.request(
            "GET",
            "/api/webhooks/",
            what=f"list webhooks of project {project_id}",
            params={"project": project_id},
        )
    except LabelStudioToolError as exc:
        if "HTTP 400" in exc.message:  # Label Studio answers 400 "Select a valid choice" for no such project
            return None
        raise
    return hooks if isinstance(hooks, list) else []


def _ml_backend_urls(api: Any, project_id: int) -> list[str]:
    backends = api.request(
        "GET", "/api/ml/", what=f"list ML backends of project {project_id}", params={"project": project_id}
    )
    return [str(b["url"]) for b in backends or [] if isinstance(b, dict) and b.get("url")]


def check_project_webhook(
    api: Any, project_id: int, *, secret: str | None = None, backend_url: str | None = None
) -> WebhookCheck:
    """Look at the webhooks Label Studio holds for a project (two calls: its webhooks, its ML backends).

    With ``secret``, the project is fine when an active webhook carries it. Without, when an active
    webhook goes to ``backend_url``'s ``/webhook`` (or, without one, to any connected ML backend's)."""
    hooks = _webhooks(api, project_id)
    if hooks is None:
        return WebhookCheck(
            project_id,
            "no_project",
            problem=f"Label Studio has no project {project_id}",
            fix="check the project id (the number in the project's URL)",
        )
    targets = (
        [webhook_url(backend_url)]
        if backend_url
        else [webhook_url(u) for u in _ml_backend_urls(api, project_id)]
    )
    ours = [h for h in hooks if _same_url(h.get("url"), targets)]
    repair = (
        f"run `surgenet-assist ls setup-project --project {project_id}` (with SURGENET_ASSIST_WEBHOOK_SECRET)"
    )
    if secret:
        carrying = [h for h in hooks if secret_matches(h.get("headers"), secret)]
        active = [h for h in carrying if h.get("is_active", True)]
        if active:
            return WebhookCheck(project_id, OK, url=str(active[0].get("url")), webhook_id=active[0].get("id"))
        if carrying:
            return WebhookCheck(
                project_id,
                "inactive",
                url=str(carrying[0].get("url")),
                webhook_id=carrying[0].get("id"),
                problem="the project's webhook is switched off in Label Studio",
                fix=repair,
            )
        wrong = [h for h in hooks if secret_matches(h.get("headers"), secret) is False]
        if wrong:
            return WebhookCheck(
                project_id,
                "wrong_secret",
                url=str(wrong[0].get("url")),
                webhook_id=wrong[0].get("id"),
                problem="the project's webhook carries another secret: its deliveries get 401",
                fix=repair + " with the backend's secret",
            )
        if ours:
            return WebhookCheck(
                project_id,
                "no_secret",
                url=str(ours[0].get("url")),
                webhook_id=ours[0].get("id"),
                problem="the project's webhook has no secret header (Label Studio created it "
                "without headers): its deliveries get 401",
                fix=repair,
            )
    elif ours:
        active = [h for h in ours if h.get("is_active", True)]
        if active:
            return WebhookCheck(project_id, OK, url=str(active[0].get("url")), webhook_id=active[0].get("id"))
        return WebhookCheck(
            project_id,
            "inactive",
            url=str(ours[0].get("url")),
            webhook_id=ours[0].get("id"),
            problem="the project's webhook is switched off in Label Studio",
            fix=repair,
        )
    if not targets:
        return WebhookCheck(
            project_id,
            "no_ml_backend",
            problem=f"project {project_id} has no ML backend and no webhook to this backend",
            fix=f"run `surgenet-assist ls setup-project --project {project_id} --backend-url URL`",
        )
    reason, fix = why_label_studio_refuses(targets[0])
    return WebhookCheck(
        project_id,
        "missing",
        url=targets[0],
        problem=f"Label Studio holds no webhook to this backend for project {project_id}, so annotations "
        f"reach the store only through `ls sync`; Label Studio skips creating it silently when {reason}",
        fix=f"{fix}; then {repair}",
    )


def ensure_project_webhook(
    api: Any, project_id: int, backend_url: str, *, secret: str | None = None
) -> WebhookCheck:
    """Create or repair the project's webhook to ``backend_url``: one active webhook, all events, with the
    payload and (given a ``secret``) the secret header; other webhooks of the project to the same URL are
    deleted. Raises :class:`LabelStudioToolError` saying why when Label Studio refuses the URL."""
    target = webhook_url(backend_url)
    hooks = _webhooks(api, project_id)
    if hooks is None:
        raise LabelStudioToolError(f"Label Studio has no project {project_id}", "check --project")
    same = sorted(
        (h for h in hooks if _same_url(h.get("url"), [target])),
        key=lambda h: (not (secret and secret_matches(h.get("headers"), secret)), h.get("id") or 0),
    )
    headers = {SECRET_HEADER: secret} if secret else {}
    settings = {"send_payload": True, "send_for_all_actions": True, "is_active": True}
    try:
        if same:
            keep, *duplicates = same
            kept = {
                k: v
                for k, v in (keep.get("headers") or {}).items()
                if str(k).lower() != SECRET_HEADER.lower()
            }
            api.request(
                "PATCH",
                f"/api/webhooks/{int(keep['id'])}/",
                what="update the project's webhook",
                json={**settings, "headers": {**kept, **headers}},
            )
            for dup in duplicates:
                api.request("DELETE", f"/api/webhooks/{int(dup['id'])}/", what="delete a duplicate webhook")
        else:
            api.request(
                "POST",
                "/api/webhooks/",
                what="create the project's webhook",
                json={"project": project_id, "url": target, "headers": headers, **settings},
            )
    except LabelStudioToolError as exc:
        refused = any(word in exc.message for word in ("not allowed", "reserved", "valid URL", "private"))
        if not refused:  # Label Studio's validation messages may quote the headers sent: never the secret
            message = exc.message.replace(secret, "***") if secret else exc.message
            raise LabelStudioToolError(message, exc.hint) from None
        reason, fix = why_label_studio_refuses(target)
        raise LabelStudioToolError(
            f"Label Studio refused the webhook {target} for project {project_id}: {reason}", fix
        ) from None
    return check_project_webhook(api, project_id, secret=secret, backend_url=backend_url)


class WebhookChecks:
    """The webhook checks ``/health`` shows, computed off the request path: all connected projects at start
    (a thread), one project when it gets connected (the webhook worker). ``/health`` reads
    :meth:`summary`, which never calls Label Studio."""

    def __init__(self, api: Any, secret: str | None) -> None:
        self.api, self.secret = api, secret
        self._lock = threading.Lock()
        self._results: dict[int, WebhookCheck] = {}
        self._state = "off" if api is None else "pending"
        self._error: str | None = None

    def start(self, projects: Iterable[int]) -> None:
        """Check these projects on a daemon thread (at most :data:`MAX_CHECKED_PROJECTS`)."""
        if self.api is None:
            return
        chosen = list(projects)[:MAX_CHECKED_PROJECTS]
        threading.Thread(
            target=self._check_all, args=(chosen,), name="surgenet-webhook-check", daemon=True
        ).start()

    def _check_all(self, projects: list[int]) -> None:
        for pid in projects:
            self.check(pid)
        with self._lock:
            if self._state == "pending":
                self._state = "checked"

    def check(self, project_id: int) -> WebhookCheck:
        """Check one project now (call off the request path) and log a problem with its fix."""
        try:
            result = check_project_webhook(self.api, project_id, secret=self.secret)
        except Exception as exc:  # noqa: BLE001 - Label Studio down, or a fake without these routes
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            result = WebhookCheck(
                project_id,
                "error",
                problem=str(message)[:300],
                fix="check LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY",
            )
        with self._lock:
            self._results[project_id] = result
        if not result.ok:
            log.warning(
                "Label Studio project %s webhook: %s. Fix: %s", project_id, result.problem, result.fix
            )
        return result

    def summary(self) -> dict[str, Any]:
        """``{"state", "projects", "problems": [...]}`` for ``/health`` (at most 10 problems listed)."""
        with self._lock:
            results = list(self._results.values())
            state = self._state
        problems = [r.to_dict(with_address=False) for r in results if not r.ok]
        if state != "off" and problems:
            state = "problems"
        return {"state": state, "projects": len(results), "problems": problems[:10]}
