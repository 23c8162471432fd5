"""Fetching task media: the SDK's ``get_local_path`` plus errors that say which URL failed and what to set.

Label Studio stores URLs, not pixels: ``/data/upload/...`` (uploads), ``/data/local-files/?d=...`` (local
storage), cloud URIs or plain http(s). The SDK resolves all of them, given Label Studio's URL and a token
(``Token`` for a legacy token, ``Bearer`` for a JWT). :class:`MediaFetcher` goes through the server's
:class:`~surgenet_assist.backend.ls_api.LabelStudioAPI` (``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``,
read once by ``BackendSettings.from_env``), which turns a personal access token into a fresh access token,
and falls back to the host and token Label Studio itself sent in ``/setup``. Tokens are never logged or
echoed in errors.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from surgenet_assist.core.errors import SurgenetAssistError

from .ls_api import LabelStudioAPI

log = logging.getLogger("surgenet_assist.backend")

ENV_HINT = (
    "set LABEL_STUDIO_URL (e.g. http://label-studio:8080, reachable from the backend) and "
    "LABEL_STUDIO_API_KEY "
    "(Account & Settings -> Personal Access Token, or a legacy token) in the backend's environment; for "
    "local-files storage you can instead set LOCAL_FILES_DOCUMENT_ROOT to the same root Label Studio serves"
)


class MediaError(SurgenetAssistError):
    """A task's media cannot be fetched or decoded (the client gets a 422 naming the URL)."""

    def __init__(self, message: str, url: str | None, hint: str = ENV_HINT) -> None:
        super().__init__(message, hint)
        self.url = url


class MediaFetcher:
    """``fetch(url, task_id) -> Path`` through the configured Label Studio connection, else through the host
    and token Label Studio sent in its last ``/setup`` (remembered per server process)."""

    def __init__(self, api: Any = None) -> None:
        self._configured = api  # a LabelStudioAPI, or None
        self._from_setup: Any = None
        self._setup_key: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def remember_setup(self, hostname: Any, token: Any) -> None:
        if not (isinstance(hostname, str) and hostname.startswith(("http://", "https://"))):
            return
        if not (isinstance(token, str) and token):
            return
        with self._lock:
            if self._setup_key != (hostname, token):
                self._from_setup = LabelStudioAPI(hostname, token)
                self._setup_key = (hostname, token)

    def __call__(self, url: str, task_id: Any = None) -> Path:
        api = self._configured or self._from_setup
        if api is None:
            return fetch_media(url, task_id)
        try:
            return fetch_media(url, task_id, hostname=api.url, token=api.access_token())
        except MediaError as exc:  # an access token that expired early: refresh once and retry
            if not (api.personal_access_token and "HTTP 401" in exc.message):
                raise
        api.invalidate()
        return fetch_media(url, task_id, hostname=api.url, token=api.access_token())


def fetch_media(url: str, task_id: Any = None, hostname: str | None = None, token: str | None = None) -> Path:
    """Local path of a task's media file (downloaded and cached by the SDK when remote).

    ``hostname``: Label Studio's URL, needed for its ``/data/...`` URLs; ``token``: its API key.
    """
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

    needs_ls = url.startswith(("/data/", "data/", "/upload", "upload", "s3://", "gs://", "azure-blob://"))
    # the SDK serves local-files URLs from this root without Label Studio (it reads the variable itself)
    local_root = url.startswith("/data/local-files") and os.environ.get("LOCAL_FILES_DOCUMENT_ROOT")
    if needs_ls and not hostname and not local_root:
        raise MediaError(
            f"cannot fetch {url}: LABEL_STUDIO_URL is not set, so the Label Studio host is unknown", url=url
        )
    try:
        local = get_local_path(url, hostname=hostname or None, access_token=token or None, task_id=task_id)
        path = Path(local)
    except FileNotFoundError as exc:
        raise MediaError(f"cannot fetch {url}: file not found ({exc})", url=url) from None
    except Exception as exc:  # noqa: BLE001 - requests HTTPError/ConnectionError, ValueError from the SDK
        status = getattr(getattr(exc, "response", None), "status_code", None)
        what = f"HTTP {status}" if status else type(exc).__name__
        detail = "authentication failed" if status in (401, 403) else str(exc).split("\n")[0][:200]
        raise MediaError(f"cannot fetch {url}: {what} ({detail})", url=url) from None
    if not path.is_file():
        raise MediaError(f"cannot fetch {url}: {path} does not exist", url=url)
    return path


def load_image(path: Path, url: str) -> np.ndarray:
    """Decode an image file to RGB uint8; a corrupt or non-image file is a :class:`MediaError`."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise MediaError(
            f"cannot decode image {url} ({data.size} bytes): not a readable PNG/JPEG/…",
            url=url,
            hint="re-export the frame as PNG or JPEG and re-import the task",
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
