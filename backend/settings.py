"""The backend's settings, read once from the environment at the edge (``BackendSettings.from_env``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from surgenet_assist.core.errors import UsageError

DEFAULT_MAX_BODY = 32 * 1024 * 1024


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
    webhook_secret: str | None = field(default=None, repr=False)  # the webhook's secret header; never printed
    webhook_max_ids: int = 1000  # distinct annotation/task ids a webhook delivery may name; more are ignored
    webhook_queue: int = 256  # webhook deliveries waiting for the worker; a full queue answers 503
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
            webhook_secret=env.get("SURGENET_ASSIST_WEBHOOK_SECRET") or None,
            webhook_max_ids=int(env.get("SURGENET_ASSIST_WEBHOOK_MAX_IDS", "1000")),
            webhook_queue=int(env.get("SURGENET_ASSIST_WEBHOOK_QUEUE", "256")),
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
        if self.webhook_max_ids < 1 or self.webhook_queue < 1:
            raise UsageError(
                "SURGENET_ASSIST_WEBHOOK_MAX_IDS and SURGENET_ASSIST_WEBHOOK_QUEUE must be at least 1",
                "leave them unset for the defaults (1000 ids, 256 deliveries)",
            )

    def label_studio_api(self) -> Any:
        """The backend's own connection to Label Studio, or None when none is configured."""
        from .ls_api import LabelStudioAPI

        if not (self.label_studio_url and self.label_studio_api_key):
            return None
        return LabelStudioAPI(self.label_studio_url, self.label_studio_api_key)


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
