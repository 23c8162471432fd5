"""One authenticated connection to a Label Studio server, for every call the backend and the tools make.

Label Studio accepts two kinds of API key:

* a **legacy token** (40 hex characters), sent as ``Authorization: Token <key>``; new organisations have
  them switched off;
* a **personal access token** (PAT), a JWT *refresh* token. Label Studio's middleware accepts only *access*
  tokens as ``Bearer``, so the PAT is exchanged at ``POST /api/token/refresh/`` for an access token (a JWT
  that lives minutes), which is refreshed shortly before it expires and once more whenever Label Studio
  answers 401.

:class:`LabelStudioAPI` hides the difference: its requests, and the media downloads of
:class:`~surgenet_assist.backend.media.MediaFetcher`, always carry a valid header. Tokens never appear in
logs, errors or ``repr``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from surgenet_assist.core.errors import SurgenetAssistError

log = logging.getLogger("surgenet_assist.backend")

#: refresh an access token this many seconds before Label Studio would reject it
REFRESH_MARGIN_S = 30.0
CHECK_HINT = "check --url and --api-key / LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"


class LabelStudioToolError(SurgenetAssistError):
    """A Label Studio API call failed (the message names the call and the status; never the token)."""


def no_answer(what: str, url: str | None, exc: Exception) -> LabelStudioToolError:
    """The error for a call Label Studio never answered (connection refused, timeout), naming where."""
    where = f" at {url}" if url else ""
    return LabelStudioToolError(
        f"Label Studio {what} failed: no answer from Label Studio{where} ({type(exc).__name__}: {exc})"[:400],
        "start Label Studio, or fix the URL (scheme, host and port)",
    )


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, unverified (Label Studio verifies them); None for a legacy token."""
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None


class LabelStudioAPI:
    """Label Studio's REST API at ``url`` with ``api_key`` (legacy token or personal access token)."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 60.0, clock: Any = time.time) -> None:
        if not url.startswith(("http://", "https://")):
            raise LabelStudioToolError(
                f"Label Studio URL {url!r} does not start with http:// or https://", CHECK_HINT
            )
        if not api_key:
            raise LabelStudioToolError("no Label Studio API key given", CHECK_HINT)
        self.url = url.rstrip("/")
        self._key = api_key
        claims = jwt_claims(api_key)
        self.personal_access_token = claims is not None and claims.get("token_type") == "refresh"
        self._access: str | None = None
        self._access_expires = 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=timeout, follow_redirects=True)

    def __repr__(self) -> str:
        kind = "personal access token" if self.personal_access_token else "legacy token"
        return f"LabelStudioAPI({self.url!r}, {kind})"

    # --- tokens ------------------------------------------------------------------------------------------
    def access_token(self) -> str:
        """The token to send now: the legacy token, or a fresh access token for a personal access token."""
        if not self.personal_access_token:
            return self._key
        with self._lock:
            if self._access is None or self._clock() >= self._access_expires - REFRESH_MARGIN_S:
                self._refresh()
            assert self._access is not None
            return self._access

    def invalidate(self) -> None:
        """Forget the access token (Label Studio refused it): the next call refreshes it."""
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        try:
            r = self._http.post(f"{self.url}/api/token/refresh/", json={"refresh": self._key})
        except httpx.HTTPError as exc:
            raise self._unreachable("token refresh", exc) from None
        if r.status_code != 200:
            raise LabelStudioToolError(
                f"Label Studio refused the personal access token (token refresh: HTTP {r.status_code})",
                "create a new token under Account & Settings -> Personal Access Token; check that personal "
                "access tokens are enabled for the organisation",
            )
        access = r.json().get("access")
        claims = jwt_claims(access or "") or {}
        self._access = access
        self._access_expires = float(claims.get("exp") or self._clock() + 60.0)
        log.info("Label Studio access token refreshed (valid %.0f s)", self._access_expires - self._clock())

    def headers(self) -> dict[str, str]:
        scheme = "Bearer" if self.personal_access_token else "Token"
        return {"Authorization": f"{scheme} {self.access_token()}"}

    # --- requests ----------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, what: str, missing_ok: bool = False, **kw: Any) -> Any:
        """JSON of ``method path``; None for a 404 when ``missing_ok``. A 401 refreshes the token once."""
        url = path if path.startswith("http") else f"{self.url}/{path.lstrip('/')}"
        for attempt in (0, 1):
            try:
                r = self._http.request(method, url, headers=self.headers(), **kw)
            except httpx.HTTPError as exc:
                raise self._unreachable(what, exc) from None
            if r.status_code == 401 and self.personal_access_token and attempt == 0:
                self.invalidate()
                continue
            break
        if r.status_code == 404 and missing_ok:
            return None
        if r.status_code >= 400:
            raise LabelStudioToolError(
                f"Label Studio {what} failed: HTTP {r.status_code} {r.text[:200]}",
                CHECK_HINT if r.status_code in (401, 403) else "see Label Studio's log for the reason",
            )
        return r.json() if r.content else None

    def get(self, path: str, *, what: str, missing_ok: bool = False, **params: Any) -> Any:
        return self.request("GET", path, what=what, missing_ok=missing_ok, params=params or None)

    def _unreachable(self, what: str, exc: Exception) -> LabelStudioToolError:
        return no_answer(what, self.url, exc)

    # --- what the backend reads --------------------------------------------------------------------------
    def annotation(self, annotation_id: int) -> dict[str, Any] | None:
        """An annotation as Label Studio holds it now; None when it is gone (deleted, or never existed)."""
        return self.get(f"/api/annotations/{int(annotation_id)}/", what="read annotation", missing_ok=True)

    def task(self, task_id: int) -> dict[str, Any] | None:
        """A task with its data; None when it is gone."""
        return self.get(f"/api/tasks/{int(task_id)}/", what="read task", missing_ok=True)

    def project(self, project_id: int) -> dict[str, Any] | None:
        """A project (``label_config`` among its fields); None when it is gone."""
        return self.get(f"/api/projects/{int(project_id)}/", what="read project", missing_ok=True)

    def tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every task of a project with its annotations, in id order (``/api/tasks/?fields=all``), with raw
        media URIs (``resolve_uri=false``: a cloud-storage ``s3://`` URI names its frame; the resolved form
        ``/tasks/{id}/resolve/?fileuri=...`` does not).

        Keyset paging: each request asks for the tasks with an id above the last one seen (the data
        manager's ``tasks:id`` filter, ordered by id), so a task deleted or created meanwhile shifts nothing.
        A page shorter than ``page_size`` is not the end (Label Studio lowers ``page_size`` to its
        ``TASK_API_PAGE_SIZE_MAX`` without saying so): the end is a page that holds all of the ``total``
        tasks it reports as left, or an empty one. Ids must grow, so every page makes progress.
        """
        after = 0
        what = f"list tasks of project {project_id}"
        while True:
            query = {
                "filters": {
                    "conjunction": "and",
                    "items": [
                        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after}
                    ],
                },
                "ordering": ["tasks:id"],
            }
            params = {
                "project": int(project_id),
                "page": 1,
                "page_size": page_size,
                "fields": "all",
                "resolve_uri": "false",
                "query": json.dumps(query),
            }
            body = self.request("GET", "/api/tasks/", what=what, params=params)
            tasks, left = (body.get("tasks"), body.get("total")) if isinstance(body, dict) else (body, None)
            if not isinstance(tasks, list) or not (left is None or isinstance(left, int)):
                raise LabelStudioToolError(
                    f"Label Studio {what}: the answer is not a task page ({type(body).__name__})",
                    "check --url: it must be Label Studio itself, not a proxy's or login page",
                )
            ids = [task.get("id") if isinstance(task, dict) else None for task in tasks]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or any(
                later <= earlier for earlier, later in zip([after, *ids], ids, strict=False)
            ):
                raise LabelStudioToolError(
                    f"Label Studio {what}: the page after task {after} holds ids {ids[:5]}, not growing ids "
                    "above it: the server did not apply the data manager's tasks:id filter",
                    "check that --url is Label Studio itself (1.23 is tested) and report its version",
                )
            yield from tasks
            if not tasks or (left is not None and len(tasks) >= left):
                return
            after = ids[-1]

    def close(self) -> None:
        self._http.close()
