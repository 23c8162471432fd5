"""The Label Studio ML backend: one Flask app factory, :func:`create_app`, wire-compatible with LS 1.23.

Routes (see ``docs/http-api.md``): ``POST /predict``, ``POST /setup``, ``POST /webhook``, ``GET /health``,
``GET /metrics``, ``GET /versions``. The model is loaded once per process (in the factory, i.e. once per
gunicorn worker), never per request; ``/setup`` and ``/health`` never touch it, so they answer well inside
Label Studio's 3 s / 1 s timeouts even while a long ``/predict`` runs on another thread.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from surgenet_assist.core.errors import SurgenetAssistError, UsageError
from surgenet_assist.core.formats.label_studio import store_project_name
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema
from surgenet_assist.core.store import is_frame_model

from .acquisition import apply_queue_scores
from .config import CVS_CRITERION, CVS_MULTI, PHASE_CHOICE, LabelConfigError, parse_label_config
from .interactive import (
    ClickSegmenters,
    InteractiveError,
    InteractiveUnavailable,
    context_regions,
    interactive_predictions,
)
from .media import MediaError, MediaFetcher
from .metrics import TASK_OF_TYPE, Metrics
from .predictions import ImageTaskModel, VideoTaskModel, day_one_predictions, empty_prediction
from .webhooks import WebhookError, WebhookHandler

log = logging.getLogger("surgenet_assist.backend")

NO_MODEL_VERSION = "no-model"
DEFAULT_MAX_BODY = 32 * 1024 * 1024
_SECRET = re.compile(r"((?:Token|Bearer)\s+|access_token['\"]?\s*[:=]\s*['\"]?)[A-Za-z0-9._\-]+", re.I)


class RedactTokens(logging.Filter):
    """Scrubs tokens from log records (``Token x``, ``Bearer x``, ``access_token=x``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if _SECRET.search(msg):
            record.msg, record.args = _SECRET.sub(r"\1***", msg), None
        return True


def _redact_tokens_in_logs() -> None:
    """The root logger and its handlers scrub tokens; adds the filter once, however many apps are built."""
    root = logging.getLogger()
    for target in (root, *root.handlers):
        if not any(isinstance(f, RedactTokens) for f in target.filters):
            target.addFilter(RedactTokens())


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

    def label_studio_api(self) -> Any:
        """The backend's own connection to Label Studio, or None when none is configured."""
        from .ls_api import LabelStudioAPI

        if not (self.label_studio_url and self.label_studio_api_key):
            return None
        return LabelStudioAPI(self.label_studio_url, self.label_studio_api_key)


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
        if predictor is not None and _model_wins(self, assist):
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


def _json_error(status: int, error: str, detail: str, hint: str | None = None, **extra: Any) -> Response:
    body = {"status": status, "error": error, "detail": detail}
    if hint:
        body["hint"] = hint
    body.update(extra)
    resp = jsonify(body)
    resp.status_code = status
    return resp


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
    assist_factory: Callable[[BackendSettings, Any, LabelSchema, Callable], Any] | None = None,
    ls_api: Any = None,
    click_segmenter: Any = None,
    click_segmenter_factory: Callable[[BackendSettings], Any] | None = None,
) -> Flask:
    """Build the backend app. ``predictor``/``store``/``fetch``/``assist`` (a day-one assistant such as
    ``training_loop.assist.DayOneAssist``)/``ls_api`` (the connection to Label Studio that verifies webhooks)
    may be injected (tests, embedding). The backend never imports the training loop itself: the CLI (the
    composition root) passes ``assist_factory``.

    Interactive mode (a ``/predict`` whose ``params.context`` holds clicks or boxes) is answered by
    ``click_segmenter`` (a ``core.interactive.ClickSegmenter``), or by the one ``click_segmenter_factory``
    builds on the first click (the CLI's shares the day-one backbone); without either such a request gets a
    503 saying interactive mode is off."""
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
    holders: dict[str, ModelHolder] = {}
    holders_lock = threading.Lock()

    def holder_for(ls_project: Any) -> ModelHolder:
        """What serves a Label Studio project: in registry mode its store project's own champion once it has
        one (loaded in the background on first use); otherwise, and until then, ``holder`` (the --model
        bundle, an injected predictor, or the store's default project's champion)."""
        name = store_project_name(ls_project, settings.store_project)
        if not settings.registry or store is None or name is None or name == store.project:
            return holder
        with holders_lock:
            own = holders.get(name)
            if own is None:
                own = holders[name] = ModelHolder(settings, store=store, project=name, load_now=False)
        own.poll()
        return own if own.predictor is not None else holder

    schema = schema or (holder.predictor.schema if holder.predictor is not None else DEFAULT_SCHEMA)
    media = MediaFetcher(ls_api)
    fetch = fetch or media
    assists: dict[str | None, Any] = {}
    assists_lock = threading.Lock()

    def assist_for(ls_project: Any) -> Any:
        """The day-one assistant of a Label Studio project (its store project's), made on first use."""
        return assist_in(store_project_name(ls_project, settings.store_project))

    def assist_in(name: str | None) -> Any:
        """The day-one assistant of a store project (an injected ``assist`` serves every project)."""
        if assist is not None or assist_factory is None or not settings.day_one or store is None:
            return assist
        with assists_lock:
            if name not in assists:
                assists[name] = assist_factory(
                    dataclasses.replace(settings, store_project=name), store, schema, fetch
                )
            return assists[name]
    clicks = ClickSegmenters(
        click_segmenter,
        factory=(lambda: click_segmenter_factory(settings)) if click_segmenter_factory is not None else None,
        store=store,
        poll_s=settings.registry_poll_s,
    )
    metrics = Metrics()
    metrics.model_loaded.set(1 if holder.predictor is not None else 0)
    webhooks = WebhookHandler(store, schema, settings.store_project, ls_api=ls_api)
    if ls_api is not None and store is not None and settings.sync_every_s > 0:
        from .sync import PeriodicSync

        PeriodicSync(ls_api, store, settings.sync_every_s, schema)  # lost webhooks repaired in the background
    webhook_mode = (
        "verified with Label Studio"
        if ls_api is not None
        else "need Basic Auth, which Label Studio does not send: run `ls sync`"
        if settings.basic_auth_user
        else "trusted as sent"
    )
    if settings.basic_auth_user and ls_api is None:
        log.warning(
            "Basic Auth is on but no Label Studio connection is configured: Label Studio sends webhooks "
            "without credentials, so annotations reach the store only through `surgenet-assist ls sync`. "
            "Set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to verify and accept webhooks."
        )
    _redact_tokens_in_logs()

    here = str(Path(__file__).resolve().parent)
    app = Flask("surgenet_assist.backend", root_path=here, instance_path=here + "/instance")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["surgenet"] = {
        "holder": holder,
        "store": store,
        "metrics": metrics,
        "settings": settings,
        "assist": assist,
        "assist_for": assist_for,
        "clicks": clicks,
    }

    # --- cross-cutting: auth, metrics, errors -------------------------------------------------------------
    @app.before_request
    def _before() -> Response | None:
        g.t0 = time.perf_counter()
        if request.path == "/health" or request.path == "/" or not settings.basic_auth_user:
            return None
        if request.path == "/webhook" and webhooks.verifies:
            return None  # Label Studio cannot send credentials; each event is re-read from its API instead
        header = request.headers.get("Authorization", "")
        ok = False
        if header.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(header[6:]).decode("utf-8").partition(":")
                ok = hmac.compare_digest(user, settings.basic_auth_user) and hmac.compare_digest(
                    pw, settings.basic_auth_pass or ""
                )
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            resp = _json_error(
                401,
                "unauthorized",
                "basic auth required",
                "set the ML backend's Basic Auth user/password in Label Studio's model settings",
            )
            resp.headers["WWW-Authenticate"] = 'Basic realm="surgenet-assist"'
            return resp
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(route, request.method, str(resp.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - getattr(g, "t0", time.perf_counter()))
        if resp.status_code >= 400:
            metrics.errors.labels(route, str(resp.status_code)).inc()
        return resp

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc: Exception) -> Response:
        return _json_error(
            413,
            "body_too_large",
            f"request body exceeds {settings.max_body} bytes",
            "send fewer tasks per request (ls preannotate --batch) or raise SURGENET_ASSIST_MAX_BODY",
        )

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return _json_error(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return _json_error(500, "internal_error", f"{type(exc).__name__}: {str(exc)[:300]}")

    def body_json() -> dict[str, Any]:
        raw = request.get_data(cache=True)
        try:
            data = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest("malformed_json", f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _BadRequest("malformed_json", "request body must be a JSON object")
        return data

    @app.errorhandler(_BadRequest)
    def _bad(exc: _BadRequest) -> Response:
        return _json_error(exc.status, exc.error, exc.detail, exc.hint, **exc.extra)

    # --- routes -------------------------------------------------------------------------------------------
    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        holder.poll()
        body = {
            "status": "UP",
            "model_class": "SurgeNetAssist",
            "model_version": holder.version,
            "model_loaded": holder.predictor is not None,
            "store": store is not None,
            "webhooks": webhook_mode,
        }
        if holder.predictor is None:
            body["warning"] = "no trained model yet: predictions are empty; annotations are still stored"
        if holder.problem:
            body["problem"] = holder.problem
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        data = body_json()
        media.remember_setup(data.get("hostname"), data.get("access_token"))
        served = holder_for(data.get("project")).serving(assist_for(data.get("project")))
        cfg = data.get("schema") or data.get("label_config")
        body: dict[str, Any] = {"model_version": served.version}
        if cfg:
            try:
                plan = parse_label_config(cfg, schema)
            except LabelConfigError as exc:
                raise _BadRequest("bad_label_config", exc.message, exc.hint) from None
            body.update(plan.summary())
            if plan.unknown_labels:
                log.warning(
                    "project %s: labels the model does not know (never predicted): %s",
                    data.get("project"),
                    ", ".join(f"{u['control']}:{u['label']}" for u in plan.unknown_labels),
                )
            if plan.skipped_controls:
                log.info("project %s: controls not filled: %s", data.get("project"), plan.skipped_controls)
        if served.kind == "none":
            body["warning"] = "no trained model yet: predictions are empty; annotations are still stored"
        elif served.kind == "day-one":
            body["warning"] = (
                "no trained model yet: predictions come from label propagation and instant heads "
                "fitted on the labels stored so far"
            )
        return jsonify(body)

    @app.post("/predict")
    def predict() -> Response:
        data = body_json()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise _BadRequest(
                "missing_tasks",
                "'tasks' must be a non-empty list of task objects",
                'send {"tasks": [{"id": 1, "data": {"image": "..."}}], "label_config": "<View>..."}',
            )
        cfg = data.get("label_config") or data.get("schema")
        if not cfg:
            raise _BadRequest(
                "missing_label_config", "'label_config' is missing", "send the project's config"
            )
        try:
            plan = parse_label_config(cfg, schema)
        except LabelConfigError as exc:
            raise _BadRequest("bad_label_config", exc.message, exc.hint) from None
        try:
            regions = context_regions(data.get("params"))
        except InteractiveError as exc:
            raise _BadRequest("bad_interactive_context", exc.message, exc.hint) from None
        if regions is not None:
            return interactive(tasks, plan, regions, data.get("project"))
        if not plan.controls:
            raise _BadRequest(
                "no_fillable_control",
                "no control in the labeling config can be filled by this model",
                "use BrushLabels/PolygonLabels, CVS or phase Choices on an Image, "
                "or TimelineLabels on a Video "
                "(see `surgenet-assist ls config`)",
                status=422,
                skipped_controls=plan.skipped_controls,
            )
        # decided before predicting: a change meanwhile makes Label Studio ask again
        served = holder_for(data.get("project")).serving(assist_for(data.get("project")))
        store_project = store_project_name(data.get("project"), settings.store_project)
        failed: dict[int, dict[str, Any]] = {}  # position in the batch -> why its prediction is empty
        positions = {id(t): i for i, t in enumerate(tasks)}

        def on_failure(task: dict[str, Any], exc: MediaError) -> None:
            if positions[id(task)] in failed:
                return  # the same task in the other part of a mixed (image + video) config
            url = _redact_url(exc.url)
            log.warning(
                "task %s: media %s unavailable, empty prediction: %s",
                task.get("id"),
                url or "(no URL in the task)",
                _redact_url(exc.message),
            )
            metrics.prediction_failures.labels("media").inc()
            failed[positions[id(task)]] = {"task": task.get("id"), "reason": "media", "url": url}

        try:
            if served.kind == "model":
                results = _predict_tasks(tasks, plan, served.predictor, settings, fetch, on_failure)
            elif served.kind == "day-one":
                results = day_one_predictions(
                    tasks, plan, served.assist, fetch, settings.video_sample_fps, served.version, on_failure
                )
            else:
                results = [empty_prediction(served.version) for _ in tasks]
        except LabelConfigError as exc:
            raise _BadRequest("bad_label_config", exc.message, exc.hint, status=422) from None
        for i in failed:  # a task that failed in one part of a mixed config says nothing at all
            results[i] = empty_prediction(served.version)
        results = apply_queue_scores(results, tasks, store, store_project)  # AL order in LS
        metrics.tasks.inc(len(tasks))
        kinds = {c.name: c.kind for c in plan.controls}
        for res in results:
            for region in res["result"]:
                task_name = TASK_OF_TYPE.get(region["type"])
                if task_name is None:
                    kind = kinds.get(region["from_name"])
                    task_name = (
                        "phase"
                        if kind == PHASE_CHOICE
                        else "cvs"
                        if kind in (CVS_MULTI, CVS_CRITERION)
                        else "other"
                    )
                metrics.predictions.labels(task_name).inc()
        body = {"results": results, "model_version": served.version}
        if failed:
            body["failed"] = [failed[i] for i in sorted(failed)]  # Label Studio reads only "results"
        return jsonify(body)

    def interactive(
        tasks: list[dict[str, Any]], plan: Any, regions: list[dict[str, Any]], ls_project: Any
    ) -> Response:
        """Label Studio's interactive mode: the clicked object's brush region, one prediction per task,
        stamped with the click engine's version (not the served model's: a different model answers)."""
        store_project = store_project_name(ls_project, settings.store_project)
        try:
            segmenter = clicks.for_project(store_project)
            results, version = interactive_predictions(
                tasks, plan, regions, segmenter, fetch, store_project
            )
        except SurgenetAssistError as exc:
            error, status = (
                ("interactive_unavailable", 503)
                if isinstance(exc, InteractiveUnavailable)
                else ("media_unavailable", 422)
                if isinstance(exc, MediaError)
                else ("bad_interactive_context", 400)  # InteractiveError, or the engine's PromptError
            )
            detail = _redact_url(exc.message) or exc.message
            # Label Studio shows the annotator only "<status> Client Error"; the log says what and how to fix
            log.warning("interactive /predict refused (%s): %s Fix: %s", error, detail, exc.hint)
            raise _BadRequest(error, detail, exc.hint, status=status) from None
        metrics.tasks.inc(len(tasks))
        for res in results:
            for _region in res["result"]:
                metrics.predictions.labels("interactive").inc()
        return jsonify({"results": results, "model_version": version})

    @app.post("/webhook")
    def webhook() -> Response:
        data = body_json()
        try:
            status, body = webhooks.handle(data)
        except WebhookError as exc:
            raise _BadRequest("bad_webhook", exc.message, exc.hint) from None
        except SurgenetAssistError as exc:
            raise _BadRequest("label_rejected", exc.message, exc.hint, status=422) from None
        metrics.webhooks.labels(str(data.get("action"))).inc()
        if status == 200 and any(a.get("labels") for a in body.get("annotations", [])):
            for project in {a.get("store_project") for a in body["annotations"]}:
                project_assist = assist_in(project)
                if project_assist is not None:
                    project_assist.label_arrived()  # refit instant heads on the worker thread; never waits
        resp = jsonify(body)
        resp.status_code = status
        return resp

    @app.get("/versions")
    @app.post("/versions")
    def versions() -> Response:
        rows = []
        if store is not None:
            try:
                rows = store.model_versions()
            except SurgenetAssistError as exc:
                log.warning("registry not readable: %s", exc.message)
        # model choices are whole-frame models: a click head (task "interactive") cannot pre-annotate a task
        names = [r["version"] for r in rows if is_frame_model(r)]
        if holder.version not in names:
            names.append(holder.version)
        return jsonify(
            {
                "versions": names,
                "current": holder.version,
                "registry": [
                    {k: (str(v) if k.endswith("_at") else v) for k, v in r.items() if k != "bundle_hash"}
                    for r in rows
                ],
            }
        )

    @app.get("/metrics")
    def metrics_route() -> Response:
        metrics.model_loaded.set(1 if holder.predictor is not None else 0)
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    return app


def _model_wins(holder: ModelHolder, assist: Any) -> bool:
    """A pinned model (``--model`` / injected) always serves; the registry's champion serves unless the
    newest instant head scores better on validation (then day-one assistance answers)."""
    if assist is None or holder.source == "given" or holder.source == holder.settings.model_path:
        return True
    try:
        return assist.serving(holder.champion()).kind == "champion"
    except Exception as exc:  # noqa: BLE001 - a registry hiccup: keep serving the champion
        log.warning("serving choice failed, serving the champion: %s", exc)
        return True


def _predict_tasks(
    tasks: list[dict[str, Any]],
    plan: Any,
    predictor: Any,
    settings: BackendSettings,
    fetch: Callable,
    on_failure: Callable[[dict[str, Any], MediaError], None],
) -> list[dict[str, Any]]:
    """One prediction per task, merging image and video controls of a mixed config."""
    merged = [{"model_version": predictor.model_version, "score": 1.0, "result": []} for _ in tasks]
    parts = []
    if plan.image_controls:
        parts.append(ImageTaskModel(predictor).predict(tasks, plan, fetch, on_failure))
    if plan.video_controls:
        video = VideoTaskModel(predictor, settings.video_sample_fps)
        parts.append(video.predict(tasks, plan, fetch, on_failure))
    for part in parts:
        for m, p in zip(merged, part, strict=True):
            m["result"] += p["result"]
            m["score"] = min(m["score"], p["score"])
    return merged


_URL_SECRET = re.compile(
    r"([?&](?:token|access_token|api_key|key|sig|signature|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token|x-goog-signature|x-goog-credential)=)[^&\s]+",
    re.I,
)


def _redact_url(text: str | None) -> str | None:
    """A URL (or a message naming one) without query-string secrets (presigned cloud URLs, tokens)."""
    return _URL_SECRET.sub(r"\1***", text) if text else text


class _BadRequest(Exception):
    def __init__(
        self, error: str, detail: str, hint: str | None = None, status: int = 400, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.error, self.detail, self.hint, self.status, self.extra = error, detail, hint, status, extra
