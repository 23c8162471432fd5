"""The Label Studio ML backend: one Flask app factory, :func:`create_app`, wire-compatible with LS 1.23.

Routes live in ``backend/routes/``, one blueprint per family, each with its guard and limits beside it
(``docs/http-api.md``): ``predict.py`` (``POST /setup``, ``POST /predict`` with interactive mode,
``/versions``), ``webhook.py`` (``POST /webhook``), ``health.py`` (``GET /health``, ``GET /metrics``). The
model is loaded once per process (in the factory, i.e. once per worker), never per request; ``/setup`` and
``/health`` never touch it, so they answer well inside Label Studio's 3 s / 1 s timeouts even while a long
``/predict`` runs on another thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from surgenet_assist.core.errors import SurgenetAssistError
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema

from .backbones import ServingBackbones
from .http import ApiError, json_error, redact_tokens_in_logs
from .interactive import ClickSegmenters
from .ls_webhooks import WebhookChecks
from .media import MediaFetcher
from .metrics import Metrics
from .routes import health, predict, webhook
from .services import BackendServices
from .serving import NO_MODEL_VERSION, ModelHolder, Serving
from .settings import BackendSettings
from .webhooks import WebhookHandler

__all__ = ["NO_MODEL_VERSION", "BackendSettings", "ModelHolder", "Serving", "create_app"]

log = logging.getLogger("surgenet_assist.backend")


def _open_store(settings: BackendSettings) -> Any:
    from surgenet_assist.core.store import LabelStore

    return LabelStore(settings.db_url, migrate=True)  # a service: brings the schema up to date


def create_app(
    settings: BackendSettings | None = None,
    *,
    predictor: Any = None,
    store: Any = None,
    schema: LabelSchema | None = None,
    fetch: Callable[[str, Any], Path] | None = None,
    assist: Any = None,
    assist_factory: Callable[[BackendSettings, Any, LabelSchema, Callable, Any], Any] | None = None,
    ls_api: Any = None,
    click_segmenter: Any = None,
    click_segmenter_factory: Callable[[BackendSettings, Any], Any] | None = None,
    backbone_loader: Callable[[], Any] | None = None,
) -> Flask:
    """Build the backend app. ``predictor``/``store``/``fetch``/``assist`` (a day-one assistant such as
    ``training_loop.assist.DayOneAssist``)/``ls_api`` (the connection to Label Studio that verifies webhooks)
    may be injected (tests, embedding). The backend never imports the training loop itself: the CLI (the
    composition root) passes ``assist_factory``.

    Interactive mode (a ``/predict`` whose ``params.context`` holds clicks or boxes) is answered by
    ``click_segmenter`` (a ``core.interactive.ClickSegmenter``), or by the one
    ``click_segmenter_factory(settings, backbone)`` builds; without either such a request gets a 503 saying
    interactive mode is off. Clicks and day-one assistance (``assist_factory(settings, store, schema, fetch,
    backbone)``) run on the served model's backbone, or on ``backbone_loader()`` (the cached SurgeNetXL
    weights, the CLI's) when no model serves: one backbone per process (``backend/backbones.py``)."""
    settings = settings or BackendSettings.from_env()
    settings.check()
    ls_api = ls_api or settings.label_studio_api()
    if store is None and (
        settings.db_url is not None or settings.registry or settings.extra.get("open_store", True)
    ):
        try:
            store = _open_store(settings)
        except SurgenetAssistError as exc:
            log.error("label store unavailable: %s", exc.message)
            store = None
    holder = ModelHolder(settings, store=store, predictor=predictor)
    schema = schema or (holder.predictor.schema if holder.predictor is not None else DEFAULT_SCHEMA)
    media = MediaFetcher.from_settings(settings, ls_api)  # bounded, cached, token only to Label Studio
    metrics = Metrics()
    metrics.model_loaded.set(1 if holder.predictor is not None else 0)
    if ls_api is not None and store is not None and settings.sync_every_s > 0:
        from .sync import PeriodicSync

        PeriodicSync(ls_api, store, settings.sync_every_s, schema)  # lost webhooks repaired in the background
    webhook_mode = _webhook_mode(settings, ls_api)
    if settings.basic_auth_user and not settings.webhook_secret:
        log.warning(
            "Basic Auth is on and no SURGENET_ASSIST_WEBHOOK_SECRET is set: Label Studio's webhook "
            "deliveries carry no credentials and are refused (401), so labels arrive through `ls sync` only. "
            "Set the secret and run `surgenet-assist ls setup-project --project ID` with it for each project."
        )
    elif not settings.basic_auth_user and not settings.webhook_secret:
        log.warning("/webhook is unauthenticated (no SURGENET_ASSIST_WEBHOOK_SECRET, no Basic Auth)")
    if store is not None and settings.store_project:
        store.ensure_project(settings.store_project)  # named by the operator: connected, for every LS project
    checks = WebhookChecks(ls_api, settings.webhook_secret)
    webhooks = WebhookHandler(
        store,
        schema,
        settings.store_project,
        ls_api=ls_api,
        max_ids=settings.webhook_max_ids,
        queue_size=settings.webhook_backlog,
        metrics=metrics,
        checks=checks,
    )
    if ls_api is not None and store is not None:
        from .sync import connected_projects

        # off the request path; /health shows the result. With one store project for every Label Studio
        # project the store cannot say which those are: each is checked when /setup connects it.
        checks.start(connected_projects(store) if settings.store_project is None else [])
    services = BackendServices(
        settings=settings,
        store=store,
        schema=schema,
        holder=holder,
        media=media,
        fetch=fetch or media,
        clicks=ClickSegmenters(
            click_segmenter,
            factory=(lambda bb: click_segmenter_factory(settings, bb)) if click_segmenter_factory else None,
            store=store,
            poll_s=settings.registry_poll_s,
        ),
        metrics=metrics,
        webhooks=webhooks,
        webhook_mode=webhook_mode,
        assist=assist,
        assist_factory=assist_factory,
        backbones=ServingBackbones(backbone_loader),
        compute=threading.BoundedSemaphore(settings.compute_slots),
    )
    webhooks.on_labels = lambda project: _label_arrived(services, project)
    redact_tokens_in_logs()

    here = str(Path(__file__).resolve().parent)
    app = Flask("surgenet_assist.backend", root_path=here, instance_path=here + "/instance")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["surgenet"] = services
    _install_cross_cutting(app, services)
    for blueprint in (health.bp, predict.bp, webhook.bp):
        app.register_blueprint(blueprint)
    return app


def _webhook_mode(settings: BackendSettings, ls_api: Any) -> str:
    """What ``/health`` says about ``/webhook``: who may deliver, and whether deliveries are verified."""
    if settings.webhook_secret:
        who = "secret header required"
    elif settings.basic_auth_user:
        who = "Basic Auth required, which Label Studio's webhooks do not send: set a webhook secret"
    else:
        who = "unauthenticated"
    how = "verified with Label Studio" if ls_api is not None else "trusted as sent"
    return f"{how}; {who}"


def _label_arrived(services: BackendServices, store_project: str | None) -> None:
    """New labels in a store project: its day-one assistant refits its instant heads in the background."""
    assistant = services.assist_in(store_project)
    if assistant is not None:
        assistant.label_arrived()


def _install_cross_cutting(app: Flask, services: BackendServices) -> None:
    """Request metrics and the one JSON error shape for every route."""
    metrics, max_body = services.metrics, services.settings.max_body

    @app.before_request
    def _start_clock() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _count(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"  # a fixed set: no caller's text
        metrics.requests.labels(route, request.method, str(resp.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - getattr(g, "t0", time.perf_counter()))
        if resp.status_code >= 400:
            metrics.errors.labels(route, str(resp.status_code)).inc()
        return resp

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc: Exception) -> Response:
        return json_error(
            413,
            "body_too_large",
            f"request body exceeds {max_body} bytes",
            "send fewer tasks per request (ls preannotate --batch) or raise SURGENET_ASSIST_MAX_BODY",
        )

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return json_error(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or exc.name)

    @app.errorhandler(ApiError)
    def _refused(exc: ApiError) -> Response:
        return json_error(exc.status, exc.error, exc.detail, exc.hint, **exc.extra)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return json_error(500, "internal_error", f"{type(exc).__name__}: {str(exc)[:300]}")
