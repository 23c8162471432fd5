"""The backend's settings, read once from the environment at the edge (``BackendSettings.from_env``)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgenet_assist.core.errors import UsageError
from surgenet_assist.core.media_limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS

DEFAULT_MAX_BODY = 32 * 1024 * 1024
DEFAULT_MAX_PROMPT_REGIONS = 300  # regions of one interactive request (an annotator clicks tens of times)
DEFAULT_CACHE_MB = 256  # in-memory features: the click engine's frames; each day-one assistant's frames


@dataclass(frozen=True)
class ServerLimits:
    """Threads, queues and timeouts of the HTTP server (``backend/server.py``), per route family.

    ``/predict`` gets its own pool, webhooks theirs, and ``/setup``/``/versions``/``/metrics`` share a small
    "control" pool, so no family's flood takes another's threads; ``/health`` needs no thread at all."""

    max_body: int = 32 * 1024 * 1024
    predict_threads: int = 16  # request threads: most wait for media; the model runs in compute_slots
    predict_queue: int = 16
    webhook_threads: int = 2
    webhook_queue: int = 64
    control_threads: int = 2
    control_queue: int = 32
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    health_refresh_s: float = 0.5
    health_stale_s: float = 30.0

    def family(self, name: str) -> tuple[int, int]:
        """(threads, queue) of a route family."""
        return getattr(self, f"{name}_threads"), getattr(self, f"{name}_queue")


@dataclass
class BackendSettings:
    """Server settings; :meth:`from_env` reads the ``SURGENET_ASSIST_*`` / LS-style variables."""

    model_path: str | None = None  # a bundle directory
    registry: bool = False  # serve the store's champion, picked up without restart
    db_url: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    max_body: int = DEFAULT_MAX_BODY
    video_sample_fps: float | None = 1.0
    batch_size: int = 8
    short_side: int | None = None
    device: str | None = None
    registry_poll_s: float = 5.0
    store_project: str | None = None  # label-store project for LS annotations (None: the store's default)
    day_one: bool = False  # label propagation + instant heads (needs the store and cached backbone weights)
    day_one_short_side: int = 256
    label_studio_url: str | None = None  # for task media under /data/... (else the URL sent in /setup)
    label_studio_api_key: str | None = field(default=None, repr=False)  # never printed
    sync_every_s: float = 0.0  # reconcile every connected Label Studio project this often (0: off)
    predict_threads: int = 16  # request threads: most wait for media; the model runs in compute_slots
    predict_queue: int = 16
    compute_slots: int = 1  # model computations at once (1 on a CPU: torch already uses every core)
    webhook_threads: int = 2
    webhook_queue: int = 64
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this
    max_prompt_regions: int = DEFAULT_MAX_PROMPT_REGIONS  # more in one interactive request: a 400
    click_cache_mb: int = DEFAULT_CACHE_MB  # the click engines' frame features (one budget, all projects)
    day_one_cache_mb: int = DEFAULT_CACHE_MB  # a day-one assistant's frame and video features
    # --- task media, fetched as an untrusted operation (backend/media.py, docs/deploy.md) ---
    media_max_pixels: int = DEFAULT_MAX_PIXELS  # width × height from the header, checked before decoding
    media_max_aspect: float = DEFAULT_MAX_ASPECT  # long side / short side
    media_max_bytes: int = 1 << 30  # one download
    media_deadline_s: float = 30.0  # one download, redirects included
    media_connect_timeout_s: float = 5.0
    media_read_timeout_s: float = 10.0  # per read
    media_cache_dir: str | None = None  # default: <data home>/media-cache
    media_cache_bytes: int = 4 << 30  # least recently used files are evicted beyond this
    media_hosts: tuple[str, ...] = ()  # allow-list of media host names ("*.example.org"); empty: any host
    media_private_networks: tuple[str, ...] = ()  # CIDRs media hosts may resolve to despite being private
    local_files_document_root: str | None = None  # read /data/local-files/?d=... from this folder
    webhook_secret: str | None = field(default=None, repr=False)  # the webhook's secret header; never printed
    webhook_max_ids: int = 1000  # distinct annotation/task ids a webhook delivery may name; more are ignored
    webhook_backlog: int = 256  # accepted webhook deliveries waiting for the webhook worker; more: 503
    preannotate_held_out: bool = False  # pre-annotate test/final videos too (backend/preannotation.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides: Any) -> BackendSettings:
        env = os.environ
        s = cls(
            model_path=env.get("SURGENET_ASSIST_MODEL") or None,
            registry=env.get("SURGENET_ASSIST_REGISTRY", "").lower() in ("1", "true", "yes"),
            db_url=env.get("SURGENET_ASSIST_DB_URL") or None,
            basic_auth_user=env.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=env.get("BASIC_AUTH_PASS") or None,
            max_body=int(env.get("SURGENET_ASSIST_MAX_BODY", DEFAULT_MAX_BODY)),
            video_sample_fps=float(env.get("SURGENET_ASSIST_VIDEO_FPS", "1")) or None,
            batch_size=int(env.get("SURGENET_ASSIST_BATCH", "8")),
            device=env.get("SURGENET_ASSIST_DEVICE") or None,
            store_project=env.get("SURGENET_ASSIST_STORE_PROJECT") or None,
            day_one=env.get("SURGENET_ASSIST_DAY_ONE", "1").lower() in ("1", "true", "yes"),
            day_one_short_side=int(env.get("SURGENET_ASSIST_DAY_ONE_SHORT_SIDE", "256")),
            label_studio_url=env.get("LABEL_STUDIO_URL") or None,
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY") or None,
            sync_every_s=float(env.get("SURGENET_ASSIST_SYNC_EVERY_S", "0")),
            predict_threads=int(env.get("SURGENET_ASSIST_PREDICT_THREADS", "16")),
            compute_slots=int(env.get("SURGENET_ASSIST_COMPUTE_SLOTS", "1")),
            predict_queue=int(env.get("SURGENET_ASSIST_PREDICT_QUEUE", "16")),
            webhook_threads=int(env.get("SURGENET_ASSIST_WEBHOOK_THREADS", "2")),
            webhook_queue=int(env.get("SURGENET_ASSIST_WEBHOOK_QUEUE", "64")),
            body_timeout_s=float(env.get("SURGENET_ASSIST_BODY_TIMEOUT_S", "30")),
            header_timeout_s=float(env.get("SURGENET_ASSIST_HEADER_TIMEOUT_S", "10")),
            max_prompt_regions=int(env.get("SURGENET_ASSIST_MAX_PROMPT_REGIONS", DEFAULT_MAX_PROMPT_REGIONS)),
            click_cache_mb=int(env.get("SURGENET_ASSIST_CLICK_CACHE_MB", DEFAULT_CACHE_MB)),
            day_one_cache_mb=int(env.get("SURGENET_ASSIST_DAY_ONE_CACHE_MB", DEFAULT_CACHE_MB)),
            **_media_from_env(env),
            webhook_secret=env.get("SURGENET_ASSIST_WEBHOOK_SECRET") or None,
            webhook_max_ids=int(env.get("SURGENET_ASSIST_WEBHOOK_MAX_IDS", "1000")),
            webhook_backlog=int(env.get("SURGENET_ASSIST_WEBHOOK_BACKLOG", "256")),
            preannotate_held_out=env.get("SURGENET_ASSIST_PREANNOTATE_HELD_OUT", "").lower()
            in ("1", "true", "yes"),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        return s

    def check(self) -> None:
        """Refuse a half configuration at start-up, with the variable to set."""
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise UsageError(
                "Basic Auth is half configured: BASIC_AUTH_USER and BASIC_AUTH_PASS go together",
                "set both (and the same pair in Label Studio's model settings), or neither",
            )
        if bool(self.label_studio_url) != bool(self.label_studio_api_key):
            raise UsageError(
                "the Label Studio connection is half configured: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                "go together",
                "set both (the key: Account & Settings -> Personal Access Token, or a legacy token)",
            )
        check_webhook_secret(self.webhook_secret)
        if self.webhook_max_ids < 1 or self.webhook_backlog < 1:
            raise UsageError(
                "SURGENET_ASSIST_WEBHOOK_MAX_IDS and SURGENET_ASSIST_WEBHOOK_BACKLOG must be at least 1",
                "leave them unset for the defaults (1000 ids, 256 deliveries)",
            )
        if self.max_prompt_regions < 1:
            raise UsageError(
                f"SURGENET_ASSIST_MAX_PROMPT_REGIONS={self.max_prompt_regions} refuses every click",
                f"set it to at least 1 (default {DEFAULT_MAX_PROMPT_REGIONS}), or unset it",
            )
        from surgenet_assist.core.model import max_input_aspect

        max_input_aspect()  # a bad SURGENET_ASSIST_MAX_ASPECT is refused at start, not on the first frame
        self._check_media()

    def _check_media(self) -> None:
        """Media caps that cannot work are refused at start-up, naming the variable."""
        positive = {
            "SURGENET_ASSIST_MEDIA_MAX_PIXELS": self.media_max_pixels,
            "SURGENET_ASSIST_MEDIA_MAX_ASPECT": self.media_max_aspect,
            "SURGENET_ASSIST_MEDIA_MAX_BYTES": self.media_max_bytes,
            "SURGENET_ASSIST_MEDIA_DEADLINE_S": self.media_deadline_s,
            "SURGENET_ASSIST_MEDIA_CONNECT_TIMEOUT_S": self.media_connect_timeout_s,
            "SURGENET_ASSIST_MEDIA_READ_TIMEOUT_S": self.media_read_timeout_s,
            "SURGENET_ASSIST_MEDIA_CACHE_BYTES": self.media_cache_bytes,
        }
        for name, value in positive.items():
            if not value > 0:
                raise UsageError(
                    f"{name}={value} must be a positive number", f"set {name} above 0, or unset it"
                )
        if self.media_max_aspect < 1:
            raise UsageError(
                f"SURGENET_ASSIST_MEDIA_MAX_ASPECT={self.media_max_aspect} is below 1",
                "set it to 1 or more (default 8)",
            )
        if self.media_max_bytes > self.media_cache_bytes:
            raise UsageError(
                f"SURGENET_ASSIST_MEDIA_MAX_BYTES ({self.media_max_bytes}) is larger than the media cache "
                f"(SURGENET_ASSIST_MEDIA_CACHE_BYTES={self.media_cache_bytes}): one file could not be kept",
                "raise SURGENET_ASSIST_MEDIA_CACHE_BYTES or lower SURGENET_ASSIST_MEDIA_MAX_BYTES",
            )
        for net in self.media_private_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise UsageError(
                    f"SURGENET_ASSIST_MEDIA_PRIVATE_NETWORKS: {net!r} is not a network",
                    "list networks in CIDR notation, comma-separated, e.g. 10.20.0.0/16,fd00:1::/64",
                ) from None
        root = self.local_files_document_root
        if root is not None and Path(root).resolve() == Path(root).resolve().parent:
            raise UsageError(
                f"LOCAL_FILES_DOCUMENT_ROOT={root} would let tasks read every file of the machine",
                "set it to the folder Label Studio serves local files from (its LOCAL_FILES_DOCUMENT_ROOT)",
            )

    def server_limits(self) -> ServerLimits:
        """The HTTP server's pools and timeouts from these settings."""
        return ServerLimits(
            max_body=self.max_body,
            predict_threads=self.predict_threads,
            predict_queue=self.predict_queue,
            webhook_threads=self.webhook_threads,
            webhook_queue=self.webhook_queue,
            body_timeout_s=self.body_timeout_s,
            header_timeout_s=self.header_timeout_s,
        )

    def label_studio_api(self) -> Any:
        """The backend's own connection to Label Studio, or None when none is configured."""
        from .ls_api import LabelStudioAPI

        if not (self.label_studio_url and self.label_studio_api_key):
            return None
        return LabelStudioAPI(self.label_studio_url, self.label_studio_api_key)


def _media_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The media settings among ``env`` (only those set), each parsed with an error naming its variable."""
    numbers = {
        "media_max_pixels": ("SURGENET_ASSIST_MEDIA_MAX_PIXELS", int),
        "media_max_aspect": ("SURGENET_ASSIST_MEDIA_MAX_ASPECT", float),
        "media_max_bytes": ("SURGENET_ASSIST_MEDIA_MAX_BYTES", int),
        "media_deadline_s": ("SURGENET_ASSIST_MEDIA_DEADLINE_S", float),
        "media_connect_timeout_s": ("SURGENET_ASSIST_MEDIA_CONNECT_TIMEOUT_S", float),
        "media_read_timeout_s": ("SURGENET_ASSIST_MEDIA_READ_TIMEOUT_S", float),
        "media_cache_bytes": ("SURGENET_ASSIST_MEDIA_CACHE_BYTES", int),
    }
    out: dict[str, Any] = {}
    for key, (name, kind) in numbers.items():
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            out[key] = kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise UsageError(f"{name}={raw!r} is not {what}", f"set {name} to {what}, or unset it") from None
    lists = {
        "media_hosts": "SURGENET_ASSIST_MEDIA_HOSTS",
        "media_private_networks": "SURGENET_ASSIST_MEDIA_PRIVATE_NETWORKS",
    }
    for key, name in lists.items():
        items = tuple(x.strip() for x in env.get(name, "").split(",") if x.strip())
        if items:
            out[key] = items
    if env.get("SURGENET_ASSIST_MEDIA_CACHE_DIR"):
        out["media_cache_dir"] = env["SURGENET_ASSIST_MEDIA_CACHE_DIR"]
    if env.get("LOCAL_FILES_DOCUMENT_ROOT"):
        out["local_files_document_root"] = env["LOCAL_FILES_DOCUMENT_ROOT"]
    return out


MIN_SECRET_LENGTH = 16


def check_webhook_secret(secret: str | None) -> None:
    """Refuse a webhook secret Label Studio cannot send as a header, or one too short to guess hard: visible
    ASCII, no spaces, at least :data:`MIN_SECRET_LENGTH` characters (the message never shows it)."""
    if secret is None:
        return
    if len(secret) < MIN_SECRET_LENGTH or not all("!" <= ch <= "~" for ch in secret):
        raise UsageError(
            f"SURGENET_ASSIST_WEBHOOK_SECRET must be at least {MIN_SECRET_LENGTH} visible ASCII characters "
            "without spaces",
            'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"',
        )
