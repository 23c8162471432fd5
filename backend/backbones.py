"""One backbone per process: the click engine and the day-one assistants run on the served model's own
backbone; the cached SurgeNetXL weights are only the fallback when no model is served.

Before, the click engine and the day-one assistant always loaded the raw SurgeNetXL weights from the cache.
A backend serving a bundle on a fresh machine (no cached weights) then answered every click with 503 although
its bundle carries a backbone, and where the weights were cached the process held two backbones (the bundle's
and SurgeNetXL's), doubling memory for features the served model does not read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from surgenet_assist.core.errors import SurgenetAssistError

log = logging.getLogger("surgenet_assist.backend")

NO_BACKBONE_HINT = (
    "serve a model (--model BUNDLE or --registry with a champion), or cache the SurgeNetXL weights on the "
    "backend (`surgenet-assist weights download surgenetxl`, or --from-file) and restart it"
)


class BackboneUnavailable(SurgenetAssistError):
    """No backbone to compute features with: no served model and no cached fallback weights."""


class ServingBackbones:
    """Which backbone computes click and day-one features for a Label Studio project: the backbone of the
    model that serves that project (``BackendServices.holder_for``), else the fallback ``loader()`` (the CLI
    passes one that reads the cached SurgeNetXL weights, never downloading), loaded at most once and dropped
    as soon as a model serves, so the process never holds both."""

    def __init__(self, loader: Callable[[], Any] | None = None) -> None:
        self._loader = loader
        self._fallback: Any = None
        self.problem: str | None = None
        self._lock = threading.Lock()

    def for_predictor(self, predictor: Any) -> Any:
        """The backbone to use beside ``predictor`` (the served model, or None)."""
        if predictor is not None:
            with self._lock:
                if self._fallback is not None:
                    log.info("a model serves now: the fallback SurgeNetXL backbone is released")
                    self._fallback = None
            return predictor.model.backbone
        return self.fallback()

    def fallback(self) -> Any:
        """The cached-weights backbone (loaded on first use; :meth:`warm` loads it at start)."""
        with self._lock:
            if self._fallback is None and self.problem is None and self._loader is not None:
                try:
                    self._fallback = self._loader()
                    log.info("fallback backbone loaded: %s", describe(self._fallback))
                except Exception as exc:  # noqa: BLE001 - no weights, no memory: say so on every use
                    self.problem = str(getattr(exc, "message", exc))
                    log.warning("no fallback backbone: %s", self.problem)
            if self._fallback is not None:
                return self._fallback
        why = f"cannot be loaded ({self.problem})" if self.problem else "not cached"
        raise BackboneUnavailable(
            f"no backbone for clicks and day-one assistance: no model is served and SurgeNetXL weights {why}",
            NO_BACKBONE_HINT,
        )

    def describe(self, predictor: Any) -> dict[str, Any]:
        """What ``/health`` and ``/setup`` say about the backbone serving now (never loads anything)."""
        if predictor is not None:
            backbone = predictor.model.backbone
            return {"source": f"served model {predictor.model_version}", **_identity(backbone)}
        with self._lock:
            if self._fallback is not None:
                return {"source": "cached SurgeNetXL weights", **_identity(self._fallback)}
        out: dict[str, Any] = {"source": "none"}
        if self.problem:
            out["problem"] = self.problem
        return out


def _identity(backbone: Any) -> dict[str, Any]:
    sha = getattr(backbone, "weights_sha256", None)
    return {"name": getattr(backbone, "name", None), "weights_sha256": sha[:12] if sha else None}


def describe(backbone: Any) -> str:
    ident = _identity(backbone)
    return f"{ident['name']} ({ident['weights_sha256']})"
