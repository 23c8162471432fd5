"""Everything the routes share, built once per process by ``create_app``: settings, the label store, what
serves each Label Studio project, the day-one assistants, the click engines, media fetching, webhooks and
metrics. Routes reach it as ``current_app.extensions["surgenet"]``."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from surgenet_assist.core.formats.label_studio import store_project_name
from surgenet_assist.core.schema import LabelSchema

from .serving import ModelHolder
from .settings import BackendSettings


@dataclass
class BackendServices:
    """The process-wide state behind the routes (one per app; under gunicorn, one per worker)."""

    settings: BackendSettings
    store: Any
    schema: LabelSchema
    holder: ModelHolder
    media: Any  # MediaFetcher
    fetch: Callable
    clicks: Any  # ClickSegmenters
    metrics: Any  # Metrics
    webhooks: Any  # WebhookHandler
    webhook_mode: str
    assist: Any = None  # an injected day-one assistant serving every project
    assist_factory: Callable[[BackendSettings, Any, LabelSchema, Callable], Any] | None = None
    _holders: dict[str, ModelHolder] = field(default_factory=dict)
    _assists: dict[str | None, Any] = field(default_factory=dict)
    _holders_lock: threading.Lock = field(default_factory=threading.Lock)
    _assists_lock: threading.Lock = field(default_factory=threading.Lock)  # a factory may load a backbone

    def store_project(self, ls_project: Any) -> str | None:
        """The store project that holds a Label Studio project's labels (``label-studio-<id>``)."""
        return store_project_name(ls_project, self.settings.store_project)

    def holder_for(self, ls_project: Any) -> ModelHolder:
        """What serves a Label Studio project: in registry mode its store project's own champion once it has
        one (loaded in the background on first use); otherwise, and until then, ``holder`` (the --model
        bundle, an injected predictor, or the store's default project's champion)."""
        name = self.store_project(ls_project)
        store, settings = self.store, self.settings
        if not settings.registry or store is None or name is None or name == store.project:
            return self.holder
        with self._holders_lock:
            own = self._holders.get(name)
            if own is None:
                own = self._holders[name] = ModelHolder(settings, store=store, project=name, load_now=False)
        own.poll()
        return own if own.predictor is not None else self.holder

    def assist_for(self, ls_project: Any) -> Any:
        """The day-one assistant of a Label Studio project (its store project's), made on first use."""
        return self.assist_in(self.store_project(ls_project))

    def assist_in(self, name: str | None) -> Any:
        """The day-one assistant of a store project (an injected ``assist`` serves every project)."""
        if (
            self.assist is not None
            or self.assist_factory is None
            or not self.settings.day_one
            or self.store is None
        ):
            return self.assist
        with self._assists_lock:
            if name not in self._assists:
                own = dataclasses.replace(self.settings, store_project=name)
                self._assists[name] = self.assist_factory(own, self.store, self.schema, self.fetch)
            return self._assists[name]
