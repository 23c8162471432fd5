"""Label Studio webhooks -> the label store (through core's translator) and the training queue.

A delivery is first **authenticated** (``routes/webhook.py``: the secret header Label Studio's project webhook
carries, ``X-Surgenet-Webhook-Secret``, or the backend's Basic Auth), then **checked** here on the request
thread, cheaply and without calling Label Studio: its shape (400), the project it names must be
**connected** (403), and its ids are de-duplicated and capped (``SURGENET_ASSIST_WEBHOOK_MAX_IDS``). The work
itself then runs on one bounded queue with its own worker thread (:class:`WebhookQueue`): Label Studio waits
at most 1 s for a delivery, inside the annotator's save, and never retries one, so the answer is ``202`` at
once; a full queue answers ``503`` (counted; ``ls sync`` repairs what was dropped). No flood of deliveries
can hold a request thread that ``/predict`` or ``/health`` needs.

**Connected** projects: a Label Studio project is connected when the store holds its store project,
``label-studio-<id>``. ``ls setup-project``, ``ls sync --project`` and Label Studio's own ``/setup`` call
connect one (``/setup`` only when authenticated by Basic Auth or, with a Label Studio connection, once Label
Studio confirms the project). With ``SURGENET_ASSIST_STORE_PROJECT`` every Label Studio project writes into
that one store project, which the backend creates at start. A webhook never creates a store project.

Two modes, chosen by whether the backend has its own Label Studio connection (``LABEL_STUDIO_URL`` and
``LABEL_STUDIO_API_KEY``):

* **verified** (with a connection): the body is only a notification. Everything is re-read from Label
  Studio's data-manager task list *of the connected project the body names* (``/api/tasks/?project=N`` with
  ``fields=all``, filtered by annotation or task ids: one call per 100 ids, never one per id): what is written
  is what Label Studio holds in that project now, and a delete is applied only to ids that project no longer
  holds. An id of another project is not found there and changes nothing.
* **trusting** (without): the body is applied as it is, into its (connected) project.

Events: ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATIONS_CREATED``, ``ANNOTATIONS_DELETED``,
``TASKS_DELETED``, ``TASKS_CREATED`` (imported tasks with their annotations; verified mode only),
``PROJECT_UPDATED`` (drops the cached labeling config at once) and ``START_TRAINING`` (one queued training
run per store project; training never runs inside the request). Anything else answers
``200 {"status": "ignored"}``.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from surgenet_assist.core.errors import DatasetFormatError, SurgenetAssistError
from surgenet_assist.core.formats.label_studio import ls_project_id, store_project_name
from surgenet_assist.core.label_studio_sync import (
    ANNOTATION_EVENTS,
    DELETE_EVENTS,
    TASK_CREATE_EVENTS,
    TASK_DELETE_EVENTS,
    WEBHOOK_HINT,
    apply_annotation,
    ingest_webhook,
    tombstone_ls_labels,
    webhook_annotations,
    webhook_ids,
)
from surgenet_assist.core.schema import LabelSchema

log = logging.getLogger("surgenet_assist.backend")

#: the header Label Studio's project webhook carries (``ls setup-project`` sets it; Label Studio allows up
#: to 10 custom headers per webhook, ``webhooks/models.py``)
SECRET_HEADER = "X-Surgenet-Webhook-Secret"
PROJECT_EVENTS = ("PROJECT_UPDATED",)
HANDLED = (
    ANNOTATION_EVENTS
    + DELETE_EVENTS
    + TASK_DELETE_EVENTS
    + TASK_CREATE_EVENTS
    + PROJECT_EVENTS
    + ("START_TRAINING",)
)
#: annotation or task ids one delivery may name; Label Studio sends at most ``WEBHOOK_BATCH_SIZE`` (5,000)
DEFAULT_MAX_IDS = 1000
DEFAULT_QUEUE_SIZE = 256  # deliveries waiting for the worker
DEFAULT_QUEUE_BYTES = 64 * 1024 * 1024  # bodies held by waiting trusted-mode deliveries
LIST_CHUNK = 100  # ids per data-manager list call (keeps the query string short)
#: a created object Label Studio does not list yet (its import or save has not committed): look again
RETRY_DELAYS_S = (1.5, 5.0)
CONFIG_TTL_S = 60.0  # a project's labeling config is re-read after this (PROJECT_UPDATED drops it at once)
CONNECTED_TTL_S = 5.0  # how long the set of connected projects is trusted before the store is asked again
CREATE_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED") + TASK_CREATE_EVENTS
SYNC_HINT = "run `surgenet-assist ls sync --project {pid}` to bring the store up to date"


class WebhookError(SurgenetAssistError, ValueError):
    """A webhook body that cannot be ingested (a 400 for the sender)."""


class WebhookRefused(SurgenetAssistError):
    """A well-formed delivery the backend will not take: ``status`` with ``error`` (also the metric's
    ``reason``): a project that is not connected (403), a full queue or no label store (503)."""

    def __init__(self, status: int, error: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status, self.error = status, error


# ---------------------------------------------------------------------------------------------------------
# the queue
# ---------------------------------------------------------------------------------------------------------
@dataclass
class WebhookJob:
    """One accepted delivery (or a connection to make): what to do, for which project, and how far it got."""

    action: str
    work: Callable[[WebhookJob], dict[str, Any]]
    ls_project: int | None = None
    store_project: str | None = None
    payload: Any = None  # the ids to re-read (verified) or the body (trusted)
    cost: int = 0  # bytes it holds while it waits
    attempt: int = 0
    id: int = 0
    outcome: dict[str, Any] = field(default_factory=dict)


class WebhookQueue:
    """A bounded FIFO of webhook work and the one thread that does it, in arrival order.

    Bounded twice: ``capacity`` waiting jobs and ``max_bytes`` of bodies they hold. :meth:`submit` never
    waits: when either bound is reached it returns False (the route answers 503). A job whose objects Label
    Studio does not list yet (``{"retry": ...}`` in its outcome) is submitted again after
    :data:`RETRY_DELAYS_S`. The last outcomes are kept for ``/health``-style inspection and tests."""

    def __init__(
        self,
        capacity: int = DEFAULT_QUEUE_SIZE,
        max_bytes: int = DEFAULT_QUEUE_BYTES,
        *,
        metrics: Any = None,
        on_done: Callable[[WebhookJob], None] | None = None,
        keep: int = 256,
    ) -> None:
        self.capacity, self.max_bytes = capacity, max_bytes
        self.metrics, self.on_done = metrics, on_done
        self._queue: queue.Queue[WebhookJob | None] = queue.Queue()
        self._lock = threading.Condition()
        self._waiting = 0  # jobs in the queue
        self._bytes = 0
        self._pending = 0  # waiting + running + scheduled for a retry
        self._ids = itertools.count(1)
        self._outcomes: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._keep = keep
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.done = 0
        self.failed = 0

    def submit(self, job: WebhookJob, *, retry: bool = False) -> bool:
        """Queue ``job`` (numbered on its first submission); False, at once, when the queue is full.
        ``retry``: the job is already counted as pending (it waited for a retry)."""
        with self._lock:
            if self._waiting >= self.capacity or self._bytes + job.cost > self.max_bytes:
                self.dropped += 1
                return False
            if not job.id:
                job.id = next(self._ids)
            self._waiting += 1
            self._bytes += job.cost
            self._pending += not retry
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="surgenet-webhooks", daemon=True)
                self._thread.start()
        self._gauge()
        self._queue.put(job)
        return True

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every submitted job (and its retries) is done; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def outcome(self, job_id: int) -> dict[str, Any] | None:
        """What a finished job did (its last attempt's outcome merged with the earlier ones)."""
        with self._lock:
            return self._outcomes.get(job_id)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": self._waiting,
                "capacity": self.capacity,
                "dropped": self.dropped,
                "done": self.done,
                "failed": self.failed,
            }

    def close(self) -> None:
        self._queue.put(None)

    # --- the worker --------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._bytes -= job.cost
            self._gauge()
            retry_in = self._run(job)
            if retry_in is not None:
                job.attempt += 1
                timer = threading.Timer(retry_in, self._resubmit, args=(job,))
                timer.daemon = True
                timer.start()
                continue
            with self._lock:
                self._outcomes[job.id] = job.outcome
                while len(self._outcomes) > self._keep:
                    self._outcomes.popitem(last=False)
                self._pending -= 1
                self._lock.notify_all()

    def _run(self, job: WebhookJob) -> float | None:
        """Do one attempt; the delay before the next one, or None when the job is finished."""
        try:
            result = job.work(job)
        except SurgenetAssistError as exc:
            log.warning("webhook %s %s failed: %s (fix: %s)", job.id, job.action, exc.message, exc.hint)
            result = {"status": "error", "detail": exc.message, "hint": exc.hint}
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one job
            log.exception("webhook %s %s failed", job.id, job.action)
            result = {"status": "error", "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}
        _merge(job.outcome, result)
        if result.get("retry") and job.attempt < len(RETRY_DELAYS_S):
            self._count("retried")
            return RETRY_DELAYS_S[job.attempt]
        job.outcome.pop("retry", None)
        failed = job.outcome.get("status") == "error"
        with self._lock:
            self.failed += failed
            self.done += not failed
        self._count("failed" if failed else "done")
        if self.on_done is not None and not failed:
            try:
                self.on_done(job)
            except Exception:  # noqa: BLE001 - a follow-up (refit trigger) must not stop the worker
                log.exception("after webhook %s", job.id)
        return None

    def _resubmit(self, job: WebhookJob) -> None:
        if not self.submit(job, retry=True):
            log.warning(
                "webhook %s %s: queue full, retry dropped (%s)",
                job.id,
                job.action,
                SYNC_HINT.format(pid=job.ls_project),
            )
            with self._lock:
                self._outcomes[job.id] = {**job.outcome, "status": "dropped"}
                self._pending -= 1
                self._lock.notify_all()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_jobs.labels(outcome).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.webhook_backlog.set(self._waiting)


@dataclass
class _Intake:
    work: Callable[[WebhookJob], dict[str, Any]] | None
    payload: Any = None
    count: int = 0
    ignored: int = 0


def _merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Fold one attempt's outcome into a job's: lists (annotations, warnings) and tombstones add up, the
    rest is the latest attempt's."""
    for key, value in more.items():
        adds_up = (key != "retry" and isinstance(value, list)) or key == "tombstones"
        into[key] = into[key] + value if adds_up and key in into else value


# ---------------------------------------------------------------------------------------------------------
# the handler
# ---------------------------------------------------------------------------------------------------------
class WebhookHandler:
    """Checks webhook deliveries on the request thread and applies them to a
    :class:`~surgenet_assist.core.store.LabelStore` on its queue's worker."""

    def __init__(
        self,
        store: Any,
        schema: LabelSchema,
        store_project: str | None = None,
        *,
        ls_api: Any = None,
        max_ids: int = DEFAULT_MAX_IDS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        metrics: Any = None,
        on_labels: Callable[[str | None], None] | None = None,
        checks: Any = None,
    ) -> None:
        self.store = store
        self.schema = schema
        self.store_project = store_project  # an override: every Label Studio project into this one
        self.api = ls_api  # a LabelStudioAPI: verified mode
        self.max_ids = max_ids
        self.metrics = metrics
        self.on_labels = on_labels  # a store project got new labels (the day-one refit); on the worker
        self.checks = checks  # a WebhookChecks: a newly connected project's webhook is checked (worker)
        self.queue = WebhookQueue(queue_size, queue_bytes, metrics=metrics, on_done=self._after)
        self._lock = threading.Lock()
        self._configs: dict[int, tuple[float, str | None]] = {}
        self._config_generation = 0
        self._connected: set[str] = set()
        self._connected_at = -float("inf")

    @property
    def verifies(self) -> bool:
        return self.api is not None

    # --- connected projects ------------------------------------------------------------------------------
    def is_connected(self, store_project: str) -> bool:
        """Whether the store holds this store project (asked at most every few seconds)."""
        with self._lock:
            if store_project in self._connected:
                return True
            if time.monotonic() - self._connected_at < CONNECTED_TTL_S:
                return False
        names = set(self.store.projects())
        with self._lock:
            self._connected |= names
            self._connected_at = time.monotonic()
            return store_project in self._connected

    def connect_later(self, ls_project: Any, *, authenticated: bool) -> bool:
        """Connect a Label Studio project that ``/setup`` named, on the worker: with a Label Studio
        connection once Label Studio confirms the project; without one only for a caller authenticated by
        Basic Auth. Returns whether a connection was queued (or was already there)."""
        pid = ls_project_id(ls_project)
        if pid is None or self.store is None or not (self.verifies or authenticated):
            return False
        name = store_project_name(pid, self.store_project)
        if self.is_connected(name):
            return True
        return self.queue.submit(WebhookJob("CONNECT", self._connect, pid, name))

    def _connect(self, job: WebhookJob) -> dict[str, Any]:
        pid = job.ls_project
        if self.verifies:
            project = self.api.project(pid)
            if project is None:
                return {"status": "refused", "detail": f"Label Studio has no project {pid}: not connected"}
            self._remember_config(pid, project.get("label_config"))
        self.store.ensure_project(job.store_project)
        with self._lock:
            self._connected.add(job.store_project)
        log.info("Label Studio project %s connected (store project %s)", pid, job.store_project)
        if self.checks is not None and self.verifies:
            self.checks.check(pid)
        return {"status": "ok", "connected": job.store_project}

    # --- intake (request thread): check, cap, queue --------------------------------------------------------
    def accept(self, body: dict[str, Any], *, size: int = 0) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one authenticated delivery: 202 once its work is queued. Nothing
        here calls Label Studio or writes a label; raises WebhookError (400) / WebhookRefused."""
        action = body.get("action")
        if not isinstance(action, str):
            raise WebhookError("webhook body has no 'action'", WEBHOOK_HINT)
        if action not in HANDLED:
            return 200, {"status": "ignored", "action": action[:64]}
        if self.store is None:
            raise WebhookRefused(503, "no_store", "no label store configured", "start with --db URL")
        try:
            intake = self._intake(action, body)
        except DatasetFormatError as exc:  # the body's shape: a 400 naming the field
            raise WebhookError(exc.message, exc.hint) from None
        pid, name = self._connected_project(action, body)
        if action in PROJECT_EVENTS:  # cheap and urgent: annotations with a new label need the new config
            self.forget_config(pid)
            return 200, {"status": "ok", "action": action, "ls_project": pid, "config_cache": "dropped"}
        if intake.work is None:
            return 200, {
                "status": "ignored",
                "action": action,
                "detail": "without a Label Studio connection imported tasks cannot be re-read",
                "hint": SYNC_HINT.format(pid=pid),
            }
        job = WebhookJob(action, intake.work, pid, name, intake.payload, cost=0 if self.verifies else size)
        if not self.queue.submit(job):
            raise WebhookRefused(
                503,
                "queue_full",
                f"the webhook queue is full ({self.queue.capacity} deliveries waiting): {action} not taken",
                SYNC_HINT.format(pid=pid) + " once the backend has caught up",
            )
        out: dict[str, Any] = {
            "status": "queued",
            "action": action,
            "job": job.id,
            "ls_project": pid,
            "store_project": name,
            "verified": self.verifies,
            "ids": intake.count,
        }
        if intake.ignored:
            out["ignored_ids"] = intake.ignored
            out["hint"] = (
                f"only the first {self.max_ids} distinct ids of a delivery are applied "
                "(SURGENET_ASSIST_WEBHOOK_MAX_IDS); " + SYNC_HINT.format(pid=pid)
            )
            log.warning(
                "%s for project %s: %d ids beyond the cap of %d not applied; %s",
                action,
                pid,
                intake.ignored,
                self.max_ids,
                SYNC_HINT.format(pid=pid),
            )
            if self.metrics is not None:
                self.metrics.webhook_ids_ignored.inc(intake.ignored)
        return 202, out

    def _intake(self, action: str, body: dict[str, Any]) -> _Intake:
        """What a delivery asks for, read from its body within the cap; raises DatasetFormatError."""
        limit = self.max_ids
        if action == "START_TRAINING":
            return _Intake(self._queue_training)
        if action in PROJECT_EVENTS:
            return _Intake(None)
        if action in ANNOTATION_EVENTS:
            webhook_annotations(body, limit=limit)  # the shape, in both modes
            named = webhook_ids(body, "annotation", limit=limit)
            if self.verifies:
                return _Intake(self._reread_annotations, named.ids, len(named.ids), named.ignored)
            return _Intake(self._trusted, body, len(named.ids), named.ignored)
        key = "tasks"
        if action in DELETE_EVENTS:
            key = "annotations" if action == "ANNOTATIONS_DELETED" else "annotation"
        named = webhook_ids(body, key, limit=limit)
        if not self.verifies:  # imported tasks need Label Studio's answer: nothing to do without one
            work = None if action in TASK_CREATE_EVENTS else self._trusted
            return _Intake(work, body, len(named.ids), named.ignored)
        work = self._reread_tasks if action in TASK_CREATE_EVENTS else self._verify_deletes
        return _Intake(work, named.ids, len(named.ids), named.ignored)

    def _connected_project(self, action: str, body: dict[str, Any]) -> tuple[int, str]:
        """The Label Studio project a delivery names and its store project, which must be connected."""
        pid = ls_project_id(body.get("project"))
        if pid is None:
            raise WebhookError(f"{action} names no Label Studio project ('project')", WEBHOOK_HINT)
        name = store_project_name(pid, self.store_project)
        if not self.is_connected(name):
            raise WebhookRefused(
                403,
                "not_connected",
                f"Label Studio project {pid} is not connected to this backend (the store has no project "
                f"{name!r}): {action} not taken",
                f"connect it once: `surgenet-assist ls setup-project --project {pid}` or "
                f"`surgenet-assist ls sync --project {pid}`",
            )
        return pid, name

    # --- trusting: the body as it is ---------------------------------------------------------------------
    def _trusted(self, job: WebhookJob) -> dict[str, Any]:
        result = ingest_webhook(
            self.store, job.payload, project=job.store_project, schema=self.schema, limit=self.max_ids
        )
        out = {**result, "status": "ok", "store_project": job.store_project, "verified": False}
        out["warnings"] = [w for a in out.get("annotations", []) for w in a.pop("skipped", [])]
        return out

    # --- verified: re-read from Label Studio -------------------------------------------------------------
    def _reread_annotations(self, job: WebhookJob) -> dict[str, Any]:
        """Annotation events: the connected project's tasks holding these annotations, as Label Studio
        holds them now, written; an annotation it no longer lists there is gone (tombstoned)."""
        ids: list[int] = job.payload
        tasks = tasks_in_project(self.api, job.ls_project, annotation_ids=ids)
        if tasks is None:
            return self._project_gone(job)
        out = self._apply_tasks(job, tasks, wanted=set(ids))
        found = out.pop("found")
        missing = [i for i in ids if i not in found]
        if missing and job.action in CREATE_EVENTS and job.attempt < len(RETRY_DELAYS_S):
            job.payload = missing  # not committed yet in Label Studio? look again shortly
            return {**out, "retry": missing}
        if missing:  # deleted since (or never in this project): the store must not keep it
            out["gone"] = missing
            out["tombstones"] = tombstone_ls_labels(
                self.store, annotation_ids=missing, project=job.store_project
            )
        return out

    def _reread_tasks(self, job: WebhookJob) -> dict[str, Any]:
        """``TASKS_CREATED``: imported tasks with the annotations they were imported with."""
        ids: list[int] = job.payload
        tasks = tasks_in_project(self.api, job.ls_project, task_ids=ids)
        if tasks is None:
            return self._project_gone(job)
        out = self._apply_tasks(job, tasks, wanted=None)
        out.pop("found")
        listed = {task.get("id") for task in tasks}
        missing = [i for i in ids if i not in listed]
        if missing and job.attempt < len(RETRY_DELAYS_S):
            job.payload = missing
            return {**out, "retry": missing}
        if missing:
            out["warnings"].append(
                f"{len(missing)} created tasks not in Label Studio's project {job.ls_project}: "
                + SYNC_HINT.format(pid=job.ls_project)
            )
        return out

    def _apply_tasks(
        self, job: WebhookJob, tasks: Iterable[dict[str, Any]], wanted: set[int] | None
    ) -> dict[str, Any]:
        """Write the annotations (``wanted`` ones, or all) of listed tasks, one transaction each."""
        out: dict[str, Any] = {
            "status": "ok",
            "action": job.action,
            "store_project": job.store_project,
            "verified": True,
            "annotations": [],
            "tombstones": 0,
            "warnings": [],
            "found": set(),
        }
        config = self._config(job.ls_project)
        for task in tasks:
            for ann in task.get("annotations") or []:
                aid = ann.get("id")
                if (wanted is not None and aid not in wanted) or aid in out["found"]:
                    continue
                if ls_project_id(ann.get("project")) not in (None, job.ls_project):
                    continue  # Label Studio says another project: never written here
                out["found"].add(aid)
                try:
                    result = apply_annotation(
                        self.store,
                        ann,
                        task,
                        label_config=config,
                        project=job.store_project,
                        schema=self.schema,
                    )
                except SurgenetAssistError as exc:  # one refused annotation; the others still count
                    log.warning(
                        "%s: annotation %s refused: %s (fix: %s)", job.action, aid, exc.message, exc.hint
                    )
                    out["annotations"].append({"annotation": aid, "error": exc.message, "hint": exc.hint})
                    continue
                out["warnings"] += result.pop("skipped", [])
                out["annotations"].append({**result, "store_project": job.store_project})
        return out

    def _verify_deletes(self, job: WebhookJob) -> dict[str, Any]:
        """Deletes count only for ids the connected project no longer holds in Label Studio."""
        ids: list[int] = job.payload
        by_annotation = job.action in DELETE_EVENTS
        kind = "annotation" if by_annotation else "task"
        if by_annotation:
            tasks = tasks_in_project(self.api, job.ls_project, annotation_ids=ids)
            present = {a.get("id") for t in tasks or [] for a in t.get("annotations") or []}
        else:
            tasks = tasks_in_project(self.api, job.ls_project, task_ids=ids)
            present = {t.get("id") for t in tasks or []}
        if tasks is None:
            return self._project_gone(job)
        gone = [i for i in ids if i not in present]
        kept = len(ids) - len(gone)
        warnings = [f"{kept} {kind}s still exist in Label Studio: delete not applied"] if kept else []
        named = {"annotation_ids": gone} if by_annotation else {"task_ids": gone}
        count = tombstone_ls_labels(self.store, project=job.store_project, **named)
        return {
            "status": "ok",
            "action": job.action,
            "store_project": job.store_project,
            "verified": True,
            "tombstones": count,
            "warnings": warnings,
            "still_exist": kept,
        }

    def _project_gone(self, job: WebhookJob) -> dict[str, Any]:
        detail = f"Label Studio has no project {job.ls_project}: nothing applied"
        log.warning("%s: %s", job.action, detail)
        return {
            "status": "ok",
            "action": job.action,
            "store_project": job.store_project,
            "verified": True,
            "tombstones": 0,
            "warnings": [detail],
        }

    # --- the labeling config -----------------------------------------------------------------------------
    def _config(self, project_id: int | None) -> str | None:
        """The project's labeling config, cached for a minute (PROJECT_UPDATED drops it at once)."""
        if project_id is None:
            return None
        with self._lock:
            cached, generation = self._configs.get(project_id), self._config_generation
        if cached is not None and time.monotonic() - cached[0] <= CONFIG_TTL_S:
            return cached[1]
        project = self.api.project(project_id) or {}
        self._remember_config(project_id, project.get("label_config"), generation)
        return project.get("label_config")

    def _remember_config(self, project_id: int, config: str | None, generation: int | None = None) -> None:
        with self._lock:  # a config read before a PROJECT_UPDATED arrived is not kept
            if generation is None or generation == self._config_generation:
                self._configs[project_id] = (time.monotonic(), config)

    def forget_config(self, project_id: int) -> None:
        with self._lock:
            self._configs.pop(project_id, None)
            self._config_generation += 1

    # --- training ------------------------------------------------------------------------------------------
    def _queue_training(self, job: WebhookJob) -> dict[str, Any]:
        params = {
            "trigger": "label-studio START_TRAINING",
            "ls_project": job.ls_project,
            "store_project": job.store_project,
            "label_version": self.store.label_version(),
        }
        # one transaction: never two queued runs of one project; the trainer claims it for that project
        run_id, added = self.store.queue_training_run(params, project=job.store_project)
        if added:
            log.info(
                "training cycle queued (training_runs.id=%s) for Label Studio project %s",
                run_id,
                job.ls_project,
            )
        return {
            "status": "ok",
            "training_run": run_id,
            "already_queued": not added,
            "store_project": job.store_project,
        }

    def _after(self, job: WebhookJob) -> None:
        """A finished job that wrote labels wakes the project's day-one assistant (it never waits)."""
        if self.on_labels is not None and any(a.get("labels") for a in job.outcome.get("annotations", [])):
            self.on_labels(job.store_project)


def tasks_in_project(
    api: Any,
    project_id: int | None,
    *,
    annotation_ids: Sequence[int] = (),
    task_ids: Sequence[int] = (),
    chunk: int = LIST_CHUNK,
) -> list[dict[str, Any]] | None:
    """The tasks of one Label Studio project, with every annotation, that hold any of ``annotation_ids`` or
    are among ``task_ids``; None when Label Studio has no such project.

    One data-manager list call (``GET /api/tasks/?project=N&fields=all``, the filter
    ``filter:tasks:annotations_ids`` or ``selectedItems``) per ``chunk`` ids, paged only if Label Studio caps
    the page below the chunk (``TASK_API_PAGE_SIZE_MAX``; the answer's ``total`` says when a chunk is
    complete). The list is scoped to the project by Label Studio itself, so an id of another project is
    simply not there. Unlike ``GET /api/tasks/{id}/`` it never asks the ML backend for predictions.
    """
    ids, by_annotation = (list(annotation_ids), True) if annotation_ids else (list(task_ids), False)
    found: dict[int, dict[str, Any]] = {}
    for lo in range(0, len(ids), chunk):
        part = ids[lo : lo + chunk]
        if by_annotation:
            holds = {
                "filter": "filter:tasks:annotations_ids",
                "operator": "contains",
                "type": "List",
                "value": ",".join(str(i) for i in part),
            }
            query: dict[str, Any] = {"filters": {"conjunction": "or", "items": [holds]}}
        else:
            query = {"selectedItems": {"all": False, "included": part}}
        page, seen = 1, 0
        while True:
            body = api.request(
                "GET",
                "/api/tasks/",
                what=f"list tasks of project {project_id}",
                missing_ok=True,
                params={
                    "project": int(project_id),
                    "fields": "all",
                    "resolve_uri": "false",
                    "page": page,
                    "page_size": chunk,
                    "query": json.dumps(query),
                },
            )
            if body is None:
                return None
            tasks = body.get("tasks") or []
            for task in tasks:
                found.setdefault(task.get("id"), task)
            seen += len(tasks)
            if not tasks or seen >= int(body.get("total") or 0) or page >= len(part):
                break
            page += 1
    return list(found.values())
