"""Task media: what a task's URL means, fetching it as an untrusted operation, and refusing oversized files.

Label Studio stores URLs, not pixels. :class:`MediaFetcher` resolves what the SDK's ``get_local_path``
resolved, without its unbounded download:

* ``/data/upload/...`` (``upload/...`` too): from Label Studio, falling back to its storage proxy
  ``/storage-data/uploaded/?filepath=...`` (cloud-backed default storage);
* ``/data/local-files/?d=<path>``: from disk under ``LOCAL_FILES_DOCUMENT_ROOT`` when the backend has that
  root and the file (a path that leaves the root is refused), otherwise from Label Studio;
* ``s3://``, ``gs://``, ``azure-blob://``: through Label Studio's ``/tasks/<id>/presign/?fileuri=<base64>``,
  which answers with the file or a redirect to a presigned URL; ``/tasks/.../resolve/...``,
  ``/projects/.../resolve/...`` and ``/storage-data/...`` (what Label Studio's API returns) likewise;
* plain ``http(s)://`` URLs.

Every download goes through one :class:`~surgenet_assist.backend.media_download.Downloader` (timeouts, one
deadline, a byte cap, checked redirects, the host allow-list and the private-address rule, atomic writes)
into one byte-bounded :class:`~surgenet_assist.backend.media_download.MediaCache`. Then the file's header is
checked against the pixel and aspect caps (:mod:`surgenet_assist.core.media_limits`) before anything decodes
it; a refused file, or one that fails to decode, leaves the cache.

Credentials: the connection is :class:`~surgenet_assist.backend.ls_api.LabelStudioAPI` (``LABEL_STUDIO_URL`` /
``LABEL_STUDIO_API_KEY``), or else the host and token Label Studio sent in ``/setup``. The token goes only to
that exact origin. The ``/setup`` host is exempt from the private-address rule only when the backend requires
Basic Auth: otherwise anyone could name it. A token Label Studio refuses, or a refresh it does not answer,
is :class:`~surgenet_assist.backend.ls_api.TokenProblem` (not a task's problem: the route answers 503 and
:attr:`MediaFetcher.token_problem` is what ``/health`` shows).

Errors: a :class:`MediaError` carries the full reason in ``message`` (for the log, which the routes redact)
and a generic ``public`` text for the client, so that error answers cannot be used to map which hosts and
ports answer. Tokens are never logged or echoed.
"""

from __future__ import annotations

import base64
import logging
import posixpath
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from surgenet_assist.core.errors import MediaTooLarge, SurgenetAssistError
from surgenet_assist.core.media_limits import MediaLimits, check_media_file, image_header

from .http import redact_url
from .ls_api import LabelStudioAPI, LabelStudioToolError, TokenProblem
from .media_download import (
    CredentialsRefused,
    Downloader,
    DownloadError,
    DownloadPolicy,
    MediaCache,
    Resolver,
    discard_if_cached,
)

log = logging.getLogger("surgenet_assist.backend")

ENV_HINT = (
    "set LABEL_STUDIO_URL (e.g. http://label-studio:8080, reachable from the backend) and "
    "LABEL_STUDIO_API_KEY "
    "(Account & Settings -> Personal Access Token, or a legacy token) in the backend's environment; for "
    "local-files storage you can instead set LOCAL_FILES_DOCUMENT_ROOT to the same root Label Studio serves"
)
FETCH_HINT = (
    "check that the URL is reachable from the backend and allowed by its media settings "
    "(SURGENET_ASSIST_MEDIA_HOSTS, SURGENET_ASSIST_MEDIA_PRIVATE_NETWORKS, docs/deploy.md); the backend's "
    "log names the reason"
)
SIZE_HINT = (
    "downscale or crop the file and re-import the task; if such frames are genuine, raise "
    "SURGENET_ASSIST_MEDIA_MAX_PIXELS / SURGENET_ASSIST_MEDIA_MAX_ASPECT"
)
#: paths on Label Studio's origin that hold task media (anything else relative is not media)
LS_MEDIA_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/projects/")
CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


class MediaError(SurgenetAssistError):
    """A task's media cannot be fetched or decoded (that task gets an empty prediction, a click a 422).

    ``message`` is the full reason, for the log; ``public`` is what a client may be told (no address, port or
    status of hosts the backend tried)."""

    def __init__(
        self, message: str, url: str | None, hint: str = ENV_HINT, public: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.url = url
        self.public = public or message


@dataclass(frozen=True)
class MediaPolicy:
    """Everything that bounds media handling, from ``BackendSettings`` (one place: :meth:`from_settings`)."""

    download: DownloadPolicy = DownloadPolicy()
    limits: MediaLimits = MediaLimits()
    cache_dir: str | None = None  # None: <data home>/media-cache
    cache_bytes: int = 4 << 30
    local_files_root: str | None = None
    setup_host_private_ok: bool = False  # the /setup host may be private (only when /setup needs Basic Auth)

    @classmethod
    def from_settings(cls, settings: Any) -> MediaPolicy:
        """The policy a ``BackendSettings`` describes."""
        return cls(
            download=DownloadPolicy(
                connect_timeout_s=settings.media_connect_timeout_s,
                read_timeout_s=settings.media_read_timeout_s,
                deadline_s=settings.media_deadline_s,
                max_bytes=settings.media_max_bytes,
                hosts=tuple(settings.media_hosts),
                private_networks=tuple(settings.media_private_networks),
            ),
            limits=MediaLimits(settings.media_max_pixels, settings.media_max_aspect),
            cache_dir=settings.media_cache_dir,
            cache_bytes=settings.media_cache_bytes,
            local_files_root=settings.local_files_document_root,
            setup_host_private_ok=bool(settings.basic_auth_user),
        )


@dataclass(frozen=True)
class _Remote:
    """A URL to download (``urls``: first choice, then fallbacks) and the key it is cached under."""

    urls: tuple[str, ...]
    key: str
    suffix: str


class MediaFetcher:
    """``fetch(url, task_id) -> Path``: a task's media as a local file whose header passed the caps.

    Through the configured Label Studio connection, else through the host and token Label Studio sent in its
    last ``/setup`` (remembered per server process). ``resolver`` replaces DNS (tests)."""

    def __init__(self, api: Any = None, policy: MediaPolicy | None = None, resolver: Resolver | None = None):
        self._configured = api  # a LabelStudioAPI, or None
        self._from_setup: Any = None
        self._setup_key: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self.policy = policy or MediaPolicy()
        self.downloader = Downloader(self.policy.download, resolver)
        self._cache: MediaCache | None = None

    @classmethod
    def from_settings(cls, settings: Any, api: Any = None) -> MediaFetcher:
        """The fetcher a ``BackendSettings`` describes, sending ``api``'s token to Label Studio."""
        return cls(api, MediaPolicy.from_settings(settings))

    @property
    def cache(self) -> MediaCache:
        """The cache folder, made on first use (opening the backend creates nothing on disk)."""
        with self._lock:
            if self._cache is None:
                from surgenet_assist.core.paths import data_home

                folder = Path(self.policy.cache_dir) if self.policy.cache_dir else data_home() / "media-cache"
                self._cache = MediaCache(folder, self.policy.cache_bytes)
            return self._cache

    def remember_setup(self, hostname: Any, token: Any) -> None:
        if not (isinstance(hostname, str) and hostname.startswith(("http://", "https://"))):
            return
        if not (isinstance(token, str) and token):
            return
        with self._lock:
            if self._setup_key != (hostname, token):
                try:
                    self._from_setup = LabelStudioAPI(hostname, token)
                except LabelStudioToolError as exc:
                    log.warning("/setup sent an unusable Label Studio host: %s", exc.message)
                    return
                self._setup_key = (hostname, token)

    @property
    def api(self) -> Any:
        """The Label Studio connection media goes through (configured, else the one ``/setup`` named)."""
        return self._configured or self._from_setup

    @property
    def token_problem(self) -> TokenProblem | None:
        """The lasting token failure of that connection, or None (``/health`` reads it; never waits)."""
        api = self.api
        return api.token_problem if api is not None else None

    # --- fetch --------------------------------------------------------------------------------------------
    def __call__(self, url: str, task_id: Any = None) -> Path:
        """The local file of a task's media. Raises :class:`MediaError` for anything wrong with this task's
        media, :class:`TokenProblem` when Label Studio refuses the backend's token."""
        shown = redact_url(url) if isinstance(url, str) else repr(url)
        try:
            path = self._fetch(url, task_id)
        except (MediaError, TokenProblem):
            raise
        except DownloadError as exc:
            raise _failed(shown, exc.reason) from None
        except Exception as exc:  # noqa: BLE001 - one task's media never fails the batch
            log.exception("fetching %s failed unexpectedly", shown)
            raise _failed(shown, f"{type(exc).__name__}: {exc}") from None
        self._check_size(path, shown)
        return path

    def _fetch(self, url: Any, task_id: Any) -> Path:
        if not isinstance(url, str) or not url.strip():
            raise MediaError(f"task {task_id}: the media URL is empty", None, hint="import the task again")
        url = url.strip()
        if url.startswith(("upload/", "/upload/")):
            url = "/data/" + url.lstrip("/")
        if url.startswith("/data/local-files"):
            local = self._local_file(url)
            if local is not None:
                return local
        remote = self._remote(url, task_id)
        entry = self.cache.entry(remote.key, remote.suffix)
        if self.cache.hit(entry):
            return entry
        last: DownloadError | None = None
        for candidate in remote.urls:
            try:
                self._download(candidate, entry)
            except DownloadError as exc:
                if exc.status in (400, 403, 404) and candidate != remote.urls[-1]:
                    last = exc  # Label Studio's other route for uploads
                    continue
                raise
            self.cache.evict(keep=entry)
            return entry
        raise last or DownloadError("no URL to try")

    def _download(self, url: str, entry: Path) -> None:
        """One download; a 401 from Label Studio refreshes a personal access token's access token once, and
        is the token problem after that."""
        api = self.api
        private_ok = api is not None and (api is self._configured or self.policy.setup_host_private_ok)
        for attempt in (0, 1):
            try:
                self.downloader.download(url, entry, label_studio=api, label_studio_private_ok=private_ok)
                return
            except CredentialsRefused:
                if attempt == 0 and api.personal_access_token:
                    api.invalidate()
                    continue
                raise api.refused("media download") from None  # /health shows it: no path

    def _remote(self, url: str, task_id: Any) -> _Remote:
        """What to download for ``url``, and under which cache key."""
        if url.startswith(CLOUD_PREFIXES):
            if task_id is None or not str(task_id).isdigit():
                raise MediaError(
                    f"cannot fetch {redact_url(url)}: a cloud-storage URI needs the task id",
                    url=url,
                    hint="send the task's id with the task (Label Studio does)",
                )
            api = self._need_api(url)
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            presign = f"{api.url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"
            return _Remote((presign,), f"{api.url}|{url}", _suffix(url))
        if url.startswith("/"):
            if not url.startswith(LS_MEDIA_PREFIXES):
                raise MediaError(
                    f"cannot fetch {redact_url(url)}: not a Label Studio media path",
                    url=url,
                    hint="tasks hold /data/upload/..., /data/local-files/?d=..., cloud URIs or http(s) URLs",
                )
            api = self._need_api(url)
            urls = [f"{api.url}{url}"]
            if url.startswith("/data/upload/"):
                urls.append(f"{api.url}/storage-data/uploaded/?filepath={url[len('/data/') :]}")
            return _Remote(tuple(urls), urls[0], _suffix(url))
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(
                f"cannot fetch {redact_url(url)}: the scheme {scheme or '(none)'!r} is not http or https",
                url=url,
                hint="import the task with an http(s) URL, an upload or a storage URI",
            )
        return _Remote((url,), url, _suffix(url))

    def _need_api(self, url: str) -> LabelStudioAPI:
        api = self.api
        if api is None:
            raise MediaError(
                f"cannot fetch {redact_url(url)}: LABEL_STUDIO_URL is not set, so the Label Studio host is "
                "unknown",
                url=url,
            )
        return api

    def _local_file(self, url: str) -> Path | None:
        """A local-files URL read from ``LOCAL_FILES_DOCUMENT_ROOT`` (None: not configured, or no such file:
        Label Studio is asked instead). Parsed like Label Studio's view: the last ``d`` wins."""
        root = self.policy.local_files_root
        if not root:
            return None
        values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("d") or [""]
        relative = posixpath.normpath(values[-1]).lstrip("/")
        if not values[-1] or relative in (".", ""):
            raise MediaError(f"{redact_url(url)} names no file", url=url, hint="import the task again")
        base = Path(root).resolve()
        path = (base / relative).resolve()
        if not path.is_relative_to(base):
            log.warning("local-files URL %s leaves LOCAL_FILES_DOCUMENT_ROOT (%s): refused", url, base)
            raise MediaError(
                f"cannot read {redact_url(url)}: the path leaves LOCAL_FILES_DOCUMENT_ROOT",
                url=url,
                hint="local-files paths are relative to the document root; '..' and links out are refused",
            )
        return path if path.is_file() else None

    def _check_size(self, path: Path, shown: str) -> None:
        """Refuse a file whose header exceeds the caps, before anything decodes it (and drop it from the
        cache: it would be refused again)."""
        try:
            check_media_file(path, self.policy.limits, what=shown, hint=SIZE_HINT)
        except MediaTooLarge as exc:
            discard_if_cached(path)
            raise MediaError(exc.message, url=shown, hint=exc.hint or SIZE_HINT) from None


def _failed(shown: str, reason: str) -> MediaError:
    """A download that failed: the reason goes to the log, the client hears only that it failed."""
    return MediaError(
        f"cannot fetch {shown}: {reason}",
        url=shown,
        hint=FETCH_HINT,
        public=f"cannot fetch {shown}: the download failed or was refused (the backend's log says why)",
    )


def _suffix(url: str) -> str:
    """The file extension a media URL names, kept on the cached file (video readers go by it): the path's,
    or that of the file a Label Studio route names in its query (``d=``, ``filepath=``, base64
    ``fileuri=``)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    named = (query.get("d") or query.get("filepath") or [None])[-1]
    if named is None and query.get("fileuri"):
        try:
            named = urlsplit(base64.urlsafe_b64decode(query["fileuri"][-1]).decode()).path
        except (ValueError, UnicodeDecodeError):
            named = None
    return posixpath.splitext(named or parts.path)[1].lstrip(".")


def load_image(path: Path, url: str) -> np.ndarray:
    """Decode an image file to RGB uint8. Only a file Pillow recognises as an image from its header is
    decoded (so the size the fetch checked is the size decoded); a corrupt or non-image file is a
    :class:`MediaError` and leaves the media cache."""
    try:
        header = image_header(path, what=url, hint=SIZE_HINT)
    except MediaTooLarge as exc:  # a decompression bomb, fetched by a fetcher that did not check
        discard_if_cached(path)
        raise MediaError(exc.message, url=url, hint=exc.hint or SIZE_HINT) from None
    if header is None:
        discard_if_cached(path)
        raise MediaError(
            f"cannot decode image {url}: not a readable PNG/JPEG/… (no image header)",
            url=url,
            hint="re-export the frame as PNG or JPEG and re-import the task",
        )
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        discard_if_cached(path)
        raise MediaError(
            f"cannot decode image {url} ({data.size} bytes): not a readable PNG/JPEG/…",
            url=url,
            hint="re-export the frame as PNG or JPEG and re-import the task",
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
