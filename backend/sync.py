"""`ls sync`: the label store holds exactly what a Label Studio project holds, whatever webhooks were lost.

Label Studio sends webhooks once (no retry without Redis, a 1 s timeout inside the annotator's save), so a
backend restart, a busy database or a refused delivery loses an event for good. Reconciliation pulls the
project's tasks with their annotations in id order (:meth:`LabelStudioAPI.tasks`: keyset pages, raw media
URIs) and hands them to core's :func:`~surgenet_assist.core.label_studio_sync.reconcile_label_studio`, which
asks Label Studio again (``GET /api/annotations/{id}/``) before it tombstones a label whose annotation it did
not see. The nightly cycle and, when configured, the backend itself run it for every connected project.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from surgenet_assist.core.formats.label_studio import STORE_PROJECT_PREFIX, store_project_name
from surgenet_assist.core.label_studio_sync import reconcile_label_studio
from surgenet_assist.core.schema import DEFAULT_SCHEMA, LabelSchema

from .ls_api import LabelStudioAPI, LabelStudioToolError

log = logging.getLogger("surgenet_assist.backend")


def sync_project(
    api: LabelStudioAPI,
    store: Any,
    ls_project: int,
    *,
    store_project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    progress: bool = False,
    page_size: int = 100,
) -> dict[str, Any]:
    """Reconcile one Label Studio project into its store project; returns the summary (``--json``)."""
    project = api.project(ls_project)
    if project is None:
        raise LabelStudioToolError(
            f"Label Studio has no project {ls_project}", "check --project (the number in the project's URL)"
        )
    name = store_project_name(ls_project, store_project)
    total = project.get("task_number")
    report = reconcile_label_studio(
        store,
        api.tasks(ls_project, page_size=page_size),
        # a 404 is the only "gone": any other failure raises before a single tombstone is written
        annotation_exists=lambda annotation_id: api.annotation(annotation_id) is not None,
        label_config=project.get("label_config"),
        project=name,
        schema=schema,
        total=int(total) if isinstance(total, int) else None,
        progress=progress,
    )
    summary = {"label_studio_project": int(ls_project), "store_project": name, **report.to_dict()}
    log.info("sync of Label Studio project %s into %s: %s", ls_project, name, summary["counts"])
    return summary


def connected_projects(store: Any) -> list[int]:
    """Label Studio projects that have a store project (``label-studio-<id>``): the ones to keep in sync."""
    ids = []
    for name in store.projects():
        suffix = name[len(STORE_PROJECT_PREFIX) :] if name.startswith(STORE_PROJECT_PREFIX) else ""
        if suffix.isdigit():
            ids.append(int(suffix))
    return sorted(ids)


def sync_all(
    api: LabelStudioAPI, store: Any, *, schema: LabelSchema = DEFAULT_SCHEMA
) -> list[dict[str, Any]]:
    """Reconcile every connected project; a project that fails is logged and the others still run."""
    out = []
    for pid in connected_projects(store):
        try:
            out.append(sync_project(api, store, pid, schema=schema))
        except Exception as exc:  # noqa: BLE001 - one project's failure must not stop the others
            log.warning("sync of Label Studio project %s failed: %s", pid, getattr(exc, "message", exc))
            out.append({"label_studio_project": pid, "error": str(getattr(exc, "message", exc))})
    return out


class PeriodicSync:
    """The backend's own reconciliation every ``every_s`` seconds (``SURGENET_ASSIST_SYNC_EVERY_S``), on a
    daemon thread, for every connected project; off when ``every_s`` is 0."""

    def __init__(self, api: LabelStudioAPI, store: Any, every_s: float, schema: LabelSchema = DEFAULT_SCHEMA):
        self.api, self.store, self.every_s, self.schema = api, store, every_s, schema
        self._stop = threading.Event()
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name="surgenet-ls-sync", daemon=True)
        if every_s > 0:
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            # several worker processes (or backends) share one database: one of them syncs per round
            with self.store.exclusive_lock("ls-sync") as mine:
                if mine:
                    sync_all(self.api, self.store, schema=self.schema)
                    self.runs += 1

    def close(self) -> None:
        self._stop.set()
