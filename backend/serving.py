"""What answers a Label Studio project's ``/predict`` and ``/setup``: the served model (a bundle, the
registry's champion, hot-swapped) or day-one assistance, and the one ``model_version`` both routes report."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from .settings import BackendSettings

log = logging.getLogger("surgenet_assist.backend")

NO_MODEL_VERSION = "no-model"


@dataclass(frozen=True)
class Serving:
    """See :meth:`ModelHolder.serving`. ``kind``: ``model`` (a bundle or the champion), ``day-one``
    (propagation + instant heads) or ``none`` (empty predictions)."""

    kind: str
    version: str
    predictor: Any = None
    assist: Any = None


class ModelHolder:
    """The served predictor (or none: day 0), swapped atomically when the registry's champion changes.

    ``project``: the store project whose champion is served (registry mode; default: the store's)."""

    def __init__(
        self,
        settings: BackendSettings,
        store: Any = None,
        predictor: Any = None,
        *,
        project: str | None = None,
        load_now: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.project = project
        self.predictor = predictor
        self.source = "given" if predictor is not None else None
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._loading = False
        self._last_poll = 0.0
        self._champion: str | None = None
        if predictor is None and settings.model_path:
            self.predictor = self._load(settings.model_path)
            self.source = settings.model_path
        elif predictor is None and settings.registry:
            self.poll(force=True, background=not load_now)

    @property
    def version(self) -> str:
        return self.predictor.model_version if self.predictor is not None else NO_MODEL_VERSION

    def serving(self, assist: Any = None) -> Serving:
        """What answers a Label Studio project's ``/predict`` now and the ``model_version`` it stamps on every
        result: the one answer ``/setup`` and ``/predict`` share. Label Studio skips a task that already has
        a prediction of the version ``/setup`` reported, so the two must agree; when what is served changes
        (a new champion, new labels or instant heads in day-one mode) the version changes and Label Studio
        asks again, once. ``assist``: the project's day-one assistant, or None."""
        self.poll()
        predictor = self.predictor
        if predictor is not None and model_wins(self, assist):
            return Serving("model", predictor.model_version, predictor=predictor)
        if assist is not None:
            assist.poll_labels()  # napari commits / imports land in the store without a webhook
            return Serving("day-one", assist.served_version(), assist=assist)
        return Serving("none", NO_MODEL_VERSION)

    def _load(self, path: str) -> Any:
        from surgenet_assist.core.predictor import Predictor

        t0 = time.perf_counter()
        predictor = Predictor.from_bundle(
            path,
            batch_size=self.settings.batch_size,
            short_side=self.settings.short_side,
            device=self.settings.device,
            allow_download=False,
        )
        log.info("loaded model %s from %s in %.1f s", predictor.model_version, path, time.perf_counter() - t0)
        return predictor

    def champion(self) -> dict[str, Any] | None:
        if self.store is None:
            return None
        return self.store.serving_champion(self.project)

    def poll(self, force: bool = False, background: bool = True) -> None:
        """Cheap check (every ``registry_poll_s`` at most) for a new champion, loaded off the request path."""
        if not self.settings.registry or self.store is None:
            return
        now = time.monotonic()
        if not force and (now - self._last_poll < self.settings.registry_poll_s or self._loading):
            return
        self._last_poll = now
        try:
            row = self.champion()
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not break serving
            self.problem = f"registry not readable: {getattr(exc, 'message', exc)}"
            return
        if row is None or row["version"] == self._champion:
            return

        def load() -> None:
            try:
                predictor = self._load(row["bundle_path"])
                predictor.model_version = row["version"]
                with self._lock:
                    self.predictor, self.source, self._champion = (
                        predictor,
                        row["bundle_path"],
                        row["version"],
                    )
                    self.problem = None
            except Exception as exc:  # noqa: BLE001 - keep serving the old model
                self._champion = row["version"]  # do not retry a broken bundle on every request
                self.problem = f"champion {row['version']} failed to load: {getattr(exc, 'message', exc)}"
                log.error(self.problem)
            finally:
                self._loading = False

        self._loading = True
        if background:
            threading.Thread(target=load, name="surgenet-registry-load", daemon=True).start()
        else:
            load()


def model_wins(holder: ModelHolder, assist: Any) -> bool:
    """A pinned model (``--model`` / injected) always serves; the registry's champion serves unless the
    newest instant head scores better on validation (then day-one assistance answers)."""
    if assist is None or holder.source == "given" or holder.source == holder.settings.model_path:
        return True
    try:
        return assist.serving(holder.champion()).kind == "champion"
    except Exception as exc:  # noqa: BLE001 - a registry hiccup: keep serving the champion
        log.warning("serving choice failed, serving the champion: %s", exc)
        return True


