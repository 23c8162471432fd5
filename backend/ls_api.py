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

Credentials go to one origin only: the exact scheme, host and port of ``LABEL_STUDIO_URL`` (:meth:`owns`).
No call follows a redirect: a token refresh answered with a 307 would otherwise hand the personal access
token to whatever the ``Location`` names. A token that Label Studio refuses, or a refresh Label Studio does
not answer, is one state, :attr:`LabelStudioAPI.token_problem`: the backend answers 503 naming it and
``/health`` is not UP until a later check succeeds.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from surgenet_assist.core.errors import SurgenetAssistError

log = logging.getLogger("surgenet_assist.backend")

#: refresh an access token this many seconds before Label Studio would reject it
REFRESH_MARGIN_S = 30.0
#: after a token failure, calls fail at once for this long (a batch does not wait on a dead Label Studio once
#: per task); reading ``token_problem`` after it starts one background re-check
TOKEN_RETRY_S = 15.0
CHECK_HINT = "check --url and --api-key / LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
REVOKED_HINT = (
    "create a new personal access token in Label Studio (Account & Settings -> Personal Access Token), set "
    "it as LABEL_STUDIO_API_KEY and restart the backend; check that personal access tokens are enabled for "
    "the organisation"
)
LEGACY_REFUSED_HINT = (
    "legacy tokens are off in this organisation, or the token was reset: create a personal access token "
    "(Account & Settings -> Personal Access Token), set it as LABEL_STUDIO_API_KEY and restart the backend"
)
UNREACHABLE_HINT = (
    "start Label Studio, or set LABEL_STUDIO_URL to the address the backend reaches it at (not localhost "
    "inside Docker); the backend retries by itself"
)
REDIRECT_HINT = (
    "set LABEL_STUDIO_URL to the exact address Label Studio answers on (scheme, host, port and sub-path), "
    "e.g. https://... when it redirects http:// there; the backend never follows a redirect with its token"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class LabelStudioToolError(SurgenetAssistError):
    """A Label Studio API call failed (the message names the call and the status; never the token)."""


class TokenProblem(LabelStudioToolError):
    """Label Studio refuses the backend's token (expired, revoked, legacy tokens off), or does not answer the
    token refresh. Not a problem of one task: ``/predict`` and clicks answer 503 with this message and
    ``/health`` is not UP while it lasts. The message names neither the token nor Label Studio's address."""


def origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) URL, lower-cased, with the default port filled in; None for
    anything else. Two URLs share credentials only when their origins are equal."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not u.host:
        return None
    return scheme, u.host.lower().rstrip("."), u.port or _DEFAULT_PORTS[scheme]


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
        self.origin = origin(self.url)
        if self.origin is None:
            raise LabelStudioToolError(f"Label Studio URL {url!r} has no host", CHECK_HINT)
        self._key = api_key
        claims = jwt_claims(api_key)
        self.personal_access_token = claims is not None and claims.get("token_type") == "refresh"
        self._access: str | None = None
        self._access_expires = 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._problem: TokenProblem | None = None  # the token state (see token_problem)
        self._problem_at = 0.0
        self._rechecking = False
        self._state_lock = threading.Lock()
        # redirects are never followed: a Location could name any origin, and the token would go with it
        self._http = httpx.Client(timeout=timeout, follow_redirects=False)

    def __repr__(self) -> str:
        kind = "personal access token" if self.personal_access_token else "legacy token"
        return f"LabelStudioAPI({self.url!r}, {kind})"

    def owns(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's exact origin (scheme, host and port): the only place that gets
        the token. ``http://`` on the host of an ``https://`` Label Studio is another origin."""
        return origin(url) == self.origin

    # --- tokens ------------------------------------------------------------------------------------------
    def access_token(self) -> str:
        """The token to send now: the legacy token, or a fresh access token for a personal access token.

        Raises :class:`TokenProblem` when the refresh fails, and at once (without asking Label Studio) for
        ``TOKEN_RETRY_S`` after a failure."""
        self._fail_fast()
        if not self.personal_access_token:
            return self._key
        with self._lock:
            self._fail_fast()  # another thread's refresh may have failed while this one waited
            if self._access is None or self._clock() >= self._access_expires - REFRESH_MARGIN_S:
                self._refresh()
            assert self._access is not None
            return self._access

    def _fail_fast(self) -> None:
        with self._state_lock:
            problem = self._problem
            if problem is not None and self._clock() - self._problem_at < TOKEN_RETRY_S:
                raise problem

    @property
    def token_problem(self) -> TokenProblem | None:
        """The token failure that lasts (None when the token works, or nothing has failed yet).

        Never waits: once the last check is ``TOKEN_RETRY_S`` old, reading it starts one background re-check
        (a refresh, or for a legacy token a ``whoami`` call), so the state clears by itself when Label Studio
        is back, even when nothing else calls it (``/health`` polls this)."""
        with self._state_lock:
            problem = self._problem
            start = (
                problem is not None
                and not self._rechecking
                and self._clock() - self._problem_at >= TOKEN_RETRY_S
            )
            if start:
                self._rechecking = True
        if start:
            threading.Thread(target=self._recheck, name="ls-token-recheck", daemon=True).start()
        return problem

    def check_token(self) -> None:
        """Ask Label Studio whether the token works now (raises :class:`TokenProblem`, or a
        :class:`LabelStudioToolError` when Label Studio does not answer, while it does not)."""
        with self._state_lock:
            self._problem_at = -math.inf  # this call asks Label Studio instead of repeating the last failure
        try:
            if self.personal_access_token:
                self.invalidate()
                self.access_token()
            else:
                self.get("/api/current-user/whoami", what="token check")
        finally:
            with self._state_lock:
                if self._problem is not None and self._problem_at == -math.inf:
                    self._problem_at = self._clock()  # not answered: the old state stands, checked now

    def _recheck(self) -> None:
        try:
            self.check_token()
        except SurgenetAssistError:
            pass  # still failing: the state (and its time) was updated where it failed
        except Exception:  # noqa: BLE001 - a background thread must not die with a traceback on stderr
            log.exception("Label Studio token re-check failed unexpectedly")
        finally:
            with self._state_lock:
                self._rechecking = False

    def _token_failed(self, message: str, hint: str) -> TokenProblem:
        """Record a token failure (logged once per change, with Label Studio's URL) and return its error."""
        problem = TokenProblem(message, hint)
        with self._state_lock:
            changed = self._problem is None or self._problem.message != message
            self._problem, self._problem_at = problem, self._clock()
        if changed:
            log.error("Label Studio at %s: %s Fix: %s", self.url, message, hint)
        return problem

    def _token_works(self) -> None:
        """Label Studio accepted the token: the token state is cleared."""
        with self._state_lock:
            if self._problem is None:
                return
            self._problem = None
        log.info("Label Studio at %s accepts the token again", self.url)

    def refused(self, what: str) -> TokenProblem:
        """Label Studio answered 401 to ``what`` with a token that should work: record, return the state."""
        if self.personal_access_token:
            self.invalidate()
            return self._token_failed(
                f"Label Studio refused the access token of the personal access token ({what}: HTTP 401)",
                REVOKED_HINT,
            )
        return self._token_failed(
            f"Label Studio refused the legacy token ({what}: HTTP 401)", LEGACY_REFUSED_HINT
        )

    def invalidate(self) -> None:
        """Forget the access token (Label Studio refused it): the next call refreshes it."""
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        try:
            r = self._http.post(f"{self.url}/api/token/refresh/", json={"refresh": self._key})
        except httpx.HTTPError as exc:
            log.warning("token refresh at %s: %s: %s", self.url, type(exc).__name__, exc)
            raise self._token_failed(
                f"Label Studio did not answer the token refresh ({type(exc).__name__}): the personal access "
                "token cannot be exchanged for an access token",
                UNREACHABLE_HINT,
            ) from None
        if r.is_redirect:
            where = origin(str(r.url.join(r.headers.get("location", ""))))
            raise self._token_failed(
                f"Label Studio answered the token refresh with a redirect (HTTP {r.status_code} to "
                f"{_origin_text(where)}); the token was not sent there",
                REDIRECT_HINT,
            )
        if r.status_code != 200:
            raise self._token_failed(
                f"Label Studio refused the personal access token (token refresh: HTTP {r.status_code}): it "
                "is expired or revoked",
                REVOKED_HINT,
            )
        try:
            access = r.json().get("access")
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str) or not access:
            raise self._token_failed(
                "Label Studio's token refresh answered without an access token", REDIRECT_HINT
            )
        claims = jwt_claims(access) or {}
        self._access = access
        self._access_expires = float(claims.get("exp") or self._clock() + 60.0)
        self._token_works()
        log.info("Label Studio access token refreshed (valid %.0f s)", self._access_expires - self._clock())

    def headers(self) -> dict[str, str]:
        scheme = "Bearer" if self.personal_access_token else "Token"
        return {"Authorization": f"{scheme} {self.access_token()}"}

    # --- requests ----------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, what: str, missing_ok: bool = False, **kw: Any) -> Any:
        """JSON of ``method path``; None for a 404 when ``missing_ok``. A 401 refreshes the token once; a
        second 401 is a :class:`TokenProblem`. Redirects are refused, not followed."""
        if path.startswith(("http://", "https://")):
            if not self.owns(path):
                raise LabelStudioToolError(
                    f"Label Studio {what}: {_origin_text(origin(path))} is not Label Studio's origin "
                    f"({_origin_text(self.origin)}); the token is not sent there",
                    CHECK_HINT,
                )
            url = path
        else:
            url = f"{self.url}/{path.lstrip('/')}"
        for attempt in (0, 1):
            try:
                r = self._http.request(method, url, headers=self.headers(), **kw)
            except httpx.HTTPError as exc:
                raise self._unreachable(what, exc) from None
            if r.status_code == 401 and self.personal_access_token and attempt == 0:
                self.invalidate()
                continue
            break
        if r.status_code == 401:
            raise self.refused(what)
        self._token_works()
        if r.is_redirect:
            where = origin(str(r.url.join(r.headers.get("location", ""))))
            raise LabelStudioToolError(
                f"Label Studio {what} failed: HTTP {r.status_code} redirect to {_origin_text(where)}, "
                "not followed",
                REDIRECT_HINT,
            )
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
        """A task with its data as stored (``resolve_uri=false``: a cloud URI stays ``s3://...``, so its frame
        identity is the same as ``ls sync`` reads); None when it is gone."""
        return self.get(
            f"/api/tasks/{int(task_id)}/", what="read task", missing_ok=True, resolve_uri="false"
        )

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


def _origin_text(where: tuple[str, str, int] | None) -> str:
    """An origin as ``scheme://host:port`` (never a path or query: those may carry secrets)."""
    if where is None:
        return "an unusable URL"
    scheme, host, port = where
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
