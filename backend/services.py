"""Everything the routes share, built once per process by ``create_app``: settings, the label store, what
serves each Label Studio project, the day-one assistants, the click engines, media fetching, webhooks and
metrics. Routes reach it as ``current_app.extensions["surgenet"]``."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from surgenet_assist.core.formats.label_studio import store_project_name
from surgenet_assist.core.schema import LabelSchema

from .backbones import BackboneUnavailable, ServingBackbones
from .serving import ModelHolder
from .settings import BackendSettings

log = logging.getLogger("surgenet_assist.backend")

#: day-one assistants (and registry holders) kept per process; the least recently used one is closed past it.
#: The project comes from the request, so without a cap any caller could make the process build one each.
MAX_PROJECTS_SERVED = 32


@dataclass
class BackendServices:
    """The process-wide state behind the routes (one per app, so one per worker process)."""

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
    #: ``assist_factory(settings, store, schema, fetch, backbone)``: a project's day-one assistant
    assist_factory: Callable[[BackendSettings, Any, LabelSchema, Callable, Any], Any] | None = None
    backbones: ServingBackbones = field(default_factory=ServingBackbones)
    #: model computations running at once in this process (``SURGENET_ASSIST_COMPUTE_SLOTS``): request threads
    #: wait for media on their own, and only the model step takes a slot, so slow media never holds the CPU
    compute: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    _holders: OrderedDict[str, ModelHolder] = field(default_factory=OrderedDict)
    _assists: OrderedDict[str | None, tuple[Any, Any]] = field(default_factory=OrderedDict)
    _holders_lock: threading.Lock = field(default_factory=threading.Lock)
    _assists_lock: threading.Lock = field(default_factory=threading.Lock)  # a factory may load a backbone

    def store_project(self, ls_project: Any) -> str | None:
        """The store project that holds a Label Studio project's labels (``label-studio-<id>``)."""
        return store_project_name(ls_project, self.settings.store_project)

    def holder_for(self, ls_project: Any) -> ModelHolder:
        """What serves a Label Studio project: in registry mode its store project's own champion once it has
        one (loaded in the background on first use); otherwise, and until then, ``holder`` (the --model
        bundle, an injected predictor, or the store's default project's champion)."""
        return self.holder_in(self.store_project(ls_project))

    def holder_in(self, name: str | None) -> ModelHolder:
        """:meth:`holder_for` by store project name."""
        store, settings = self.store, self.settings
        if not settings.registry or store is None or name is None or name == store.project:
            return self.holder
        with self._holders_lock:
            own = self._holders.get(name)
            if own is None:
                own = self._holders[name] = ModelHolder(settings, store=store, project=name, load_now=False)
                while len(self._holders) > MAX_PROJECTS_SERVED:
                    self._holders.popitem(last=False)
            self._holders.move_to_end(name)
        own.poll()
        return own if own.predictor is not None else self.holder

    def backbone_in(self, name: str | None) -> Any:
        """The backbone for a store project's clicks and day-one features: its served model's, else the
        cached SurgeNetXL fallback (``backend/backbones.py``); raises :class:`BackboneUnavailable`."""
        return self.backbones.for_predictor(self.holder_in(name).predictor)

    def backbone_info(self, ls_project: Any = None) -> dict[str, Any]:
        """Which backbone serves a Label Studio project (for ``/health`` and ``/setup``; loads nothing)."""
        return self.backbones.describe(self.holder_for(ls_project).predictor)

    def click_engine(self, ls_project: Any) -> Any:
        """The engine that answers a Label Studio project's clicks, on that project's backbone."""
        name = self.store_project(ls_project)
        return self.clicks.for_project(name, lambda: self.backbone_in(name))

    def assist_for(self, ls_project: Any) -> Any:
        """The day-one assistant of a Label Studio project (its store project's), made on first use."""
        return self.assist_in(self.store_project(ls_project))

    def assist_in(self, name: str | None) -> Any:
        """The day-one assistant of a store project (an injected ``assist`` serves every project), on the
        project's backbone; rebuilt when that backbone changes (a new champion), None without a backbone."""
        if (
            self.assist is not None
            or self.assist_factory is None
            or not self.settings.day_one
            or self.store is None
        ):
            return self.assist
        try:
            backbone = self.backbone_in(name)
        except BackboneUnavailable as exc:
            log.debug("day-one assistance off for %s: %s", name, exc.message)
            return None
        retired = []
        with self._assists_lock:
            held = self._assists.get(name)
            if held is None or held[0] is not backbone:
                if held is not None:
                    retired.append(held[1])
                own = dataclasses.replace(self.settings, store_project=name)
                assist = self.assist_factory(own, self.store, self.schema, self.fetch, backbone)
                self._assists[name] = held = (backbone, assist)
                while len(self._assists) > MAX_PROJECTS_SERVED:
                    retired.append(self._assists.popitem(last=False)[1][1])
            self._assists.move_to_end(name)
        for old in retired:  # its instant-head worker stops; its features were for another backbone
            if old is not None and hasattr(old, "close"):
                old.close()
        return held[1]

    def warm(self) -> None:
        """Load at start what the first requests would otherwise wait for (Label Studio gives ``/setup`` 3 s):
        the fallback backbone when no model serves, and the default project's click engine."""
        try:
            self.backbone_in(None)
        except BackboneUnavailable as exc:
            log.warning("%s Fix: %s", exc.message, exc.hint)
            return
        try:
            self.click_engine(None)
        except Exception as exc:  # noqa: BLE001 - interactive mode is optional; every click will say why
            log.warning("click engine not ready: %s", getattr(exc, "message", exc))
