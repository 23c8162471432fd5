"""Label Studio -> label store over time: webhook ingestion and reconciliation (``ls sync``).

:mod:`surgenet_assist.core.formats.label_studio` translates one Label Studio annotation into store labels and
back; this module decides *when* and *what* to write as Label Studio's state changes: an annotation event
applied as one transaction (:func:`apply_annotation`, :func:`ingest_webhook`), deletes as tombstones
(:func:`tombstone_ls_labels`), and a whole project made equal to Label Studio's
(:func:`reconcile_label_studio`).
The backend's verified webhooks (``backend/webhooks.py``) and ``ls sync`` (``backend/sync.py``) call these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .errors import DatasetFormatError, SurgenetAssistError
from .formats import ImportReport, PendingLabel, VideoInfo, progress_iter, write_labels
from .formats.label_studio import LabelStudioTranslator, ls_integer
from .schema import DEFAULT_SCHEMA, LabelSchema
from .store import LabelStore, RecordResult, to_utc

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETE_EVENTS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")  # the singular: Label Studio before 1.9
TASK_DELETE_EVENTS = ("TASKS_DELETED",)
TASK_CREATE_EVENTS = ("TASKS_CREATED",)  # tasks imported with their annotations send only this
#: every action Label Studio 1.23's webhooks send (``webhooks/models.py``), the legacy singular delete, and
#: ``START_TRAINING`` (sent by its ML connector to ``/webhook``): a closed set, so metrics never grow with
#: whatever a caller puts into ``action``
LABEL_STUDIO_ACTIONS = frozenset(
    {
        *ANNOTATION_EVENTS,
        *DELETE_EVENTS,
        *TASK_DELETE_EVENTS,
        *TASK_CREATE_EVENTS,
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
        "START_TRAINING",
    }
)
WEBHOOK_HINT = "send Label Studio's webhook body unchanged (see docs/http-api.md)"


@dataclass(frozen=True)
class WebhookIds:
    """The distinct ids a webhook names, in the order it names them, up to a cap; ``ignored`` counts the
    entries after the cap was reached (neither read nor applied: ``ls sync`` repairs what they named)."""

    ids: list[int]
    ignored: int = 0


def webhook_annotations(
    body: dict[str, Any], *, limit: int | None = None
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(annotation, task) pairs an annotation event carries: one for ``ANNOTATION_CREATED`` /
    ``ANNOTATION_UPDATED``, several for ``ANNOTATIONS_CREATED`` (``annotation`` and ``task`` are lists
    there, paired by the annotation's ``task``). Malformed bodies raise :class:`DatasetFormatError` naming
    the field. ``limit``: at most this many distinct annotations (by id) are read, later ones are skipped
    unread, so a huge body costs no more than ``limit`` annotations."""
    action = body.get("action")
    anns, tasks = body.get("annotation"), body.get("task")
    if action == "ANNOTATIONS_CREATED":
        if not isinstance(anns, list) or not isinstance(tasks, list):
            raise DatasetFormatError(f"{action}: 'annotation' and 'task' must be lists", WEBHOOK_HINT)
        by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
        pairs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        for ann in anns:
            if limit is not None and len(pairs) >= limit:
                break
            if not isinstance(ann, dict):
                raise DatasetFormatError(f"{action}: an annotation is not an object", WEBHOOK_HINT)
            task = by_id.get(ann.get("task"))
            if task is None:
                raise DatasetFormatError(
                    f"{action}: annotation {ann.get('id')!r} names task {ann.get('task')!r}, which is not "
                    "in 'task'",
                    WEBHOOK_HINT,
                )
            pairs.setdefault(ls_integer(ann.get("id"), f"{action}: annotation id"), (ann, task))
        return list(pairs.values())
    if not isinstance(anns, dict):
        raise DatasetFormatError(f"{action} without an 'annotation' object", WEBHOOK_HINT)
    if not isinstance(tasks, dict):
        raise DatasetFormatError(f"{action} without a 'task' object", WEBHOOK_HINT)
    ls_integer(anns.get("id"), "annotation id")
    return [(anns, tasks)]


def webhook_ids(body: dict[str, Any], key: str, *, limit: int | None = None) -> WebhookIds:
    """Distinct ids of the objects listed under ``key`` (``annotations`` of ``ANNOTATIONS_DELETED``,
    ``tasks`` of ``TASKS_DELETED`` / ``TASKS_CREATED``, ``annotation`` of the legacy singular delete); each
    must be an integer. With ``limit``, reading stops at that many distinct ids and the rest is counted in
    ``ignored`` (unvalidated): one delivery naming thousands of ids costs at most ``limit``."""
    items = body.get(key)
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise DatasetFormatError(f"{body.get('action')} without a '{key}' list", WEBHOOK_HINT)
    ids: dict[int, None] = {}
    for read, item in enumerate(items):
        if limit is not None and len(ids) >= limit:
            return WebhookIds(list(ids), len(items) - read)
        raw = item.get("id") if isinstance(item, dict) else item
        ids[ls_integer(raw, f"{body.get('action')}: {key} id")] = None
    return WebhookIds(list(ids))


def apply_annotation(
    store: LabelStore,
    annotation: dict[str, Any],
    task: dict[str, Any],
    *,
    label_config: str | None = None,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
) -> dict[str, Any]:
    """Make the store hold exactly what one Label Studio annotation says now, in one transaction.

    Its labels (read with ``label_config``) are written; its other live labels (a class no longer painted,
    a phase dropped, a moved phase range) are tombstoned. A skipped (cancelled) annotation has no labels.
    Writing the same annotation again changes nothing (the store is idempotent on content + timestamp).
    Returns ``{"annotation", "labels": {task: {annotation_id, revision, created}}, "tombstoned",
    "skipped": [reasons]}``; raises :class:`SchemaError` / :class:`DatasetFormatError` for an annotation it
    refuses, writing nothing.
    """
    ann_id = ls_integer(annotation.get("id"), "annotation id")
    tr = LabelStudioTranslator.for_config(
        label_config if isinstance(label_config, str) and label_config.strip() else None, schema
    )
    if annotation.get("was_cancelled"):
        labels: list[PendingLabel] = []
        skipped = ["annotation was skipped (cancelled) in Label Studio: it holds no labels"]
    else:
        labels, skipped = tr.read(task, annotation)
    target = tr.target(task)
    report = ImportReport("label-studio-webhook", f"annotation {ann_id}")
    videos = {lab.video: VideoInfo() for lab in labels} or {target.video: VideoInfo()}
    results = write_labels(
        store,
        videos,
        labels,
        report,
        project,
        replace_ls_annotations=[ann_id],
        replaced_at=to_utc(annotation.get("updated_at") or datetime.now(UTC)),
    )
    recorded = {lab.task: _recorded(res, False) for lab, res in zip(labels, results, strict=True) if res}
    return {
        "annotation": ann_id,
        "labels": recorded,
        "tombstoned": report.counts.get("tombstoned (replaced)", 0),
        "skipped": skipped,
    }


def tombstone_ls_labels(
    store: LabelStore,
    *,
    annotation_ids: Sequence[int] | None = None,
    task_ids: Sequence[int] | None = None,
    project: str | None = None,
    when: datetime | str | None = None,
) -> int:
    """Tombstone, in one transaction, every live label of these Label Studio annotations or tasks (a task
    deleted in Label Studio takes its annotations with it, without an annotation event); returns how many."""
    when_utc = to_utc(when or datetime.now(UTC))

    if not annotation_ids and not task_ids:
        return 0
    return store.transaction(
        lambda w: w.tombstone_ls_labels(
            project, ls_annotation_ids=annotation_ids, ls_task_ids=task_ids, updated_at=when_utc
        )
    )


def ingest_webhook(
    store: LabelStore,
    body: dict[str, Any],
    *,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    limit: int | None = None,
) -> dict[str, Any]:
    """Apply a Label Studio webhook body as it is (the caller trusts it: see ``backend/webhooks.py`` for the
    verified path that re-reads each object from Label Studio first).

    ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATIONS_CREATED``: :func:`apply_annotation` for
    each annotation, with the labeling config of the body's project. ``ANNOTATIONS_DELETED``
    (``{"annotations": [{"id"}]}``) and ``TASKS_DELETED`` (``{"tasks": [{"id"}]}``): tombstones. Other actions
    are ignored. ``limit``: at most this many distinct annotations or ids are applied (see
    :func:`webhook_ids`). Returns ``{"action", "annotations": [apply_annotation results], "tombstones"}`` or
    ``{"action", "ignored": True}``, with ``ignored_ids`` when the limit cut the list.
    """
    action = body.get("action")
    if action in DELETE_EVENTS:
        key = "annotations" if action == "ANNOTATIONS_DELETED" else "annotation"
        named = webhook_ids(body, key, limit=limit)
        count = tombstone_ls_labels(store, annotation_ids=named.ids, project=project)
        return {"action": action, "tombstones": count, "ignored_ids": named.ignored}
    if action in TASK_DELETE_EVENTS:
        named = webhook_ids(body, "tasks", limit=limit)
        count = tombstone_ls_labels(store, task_ids=named.ids, project=project)
        return {"action": action, "tombstones": count, "ignored_ids": named.ignored}
    if action not in ANNOTATION_EVENTS:
        return {"action": action, "ignored": True}
    cfg = (body.get("project") or {}).get("label_config") if isinstance(body.get("project"), dict) else None
    results = [
        apply_annotation(store, ann, task, label_config=cfg, project=project, schema=schema)
        for ann, task in webhook_annotations(body, limit=limit)
    ]
    return {"action": action, "annotations": results}


ANALYZE_AFTER = 500  # labels written by one sync after which the database's planner statistics are refreshed


def reconcile_label_studio(
    store: LabelStore,
    tasks: Iterable[dict[str, Any]],
    *,
    label_config: str | None = None,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    total: int | None = None,
    progress: bool = False,
    batch_tasks: int = 50,
) -> ImportReport:
    """Make the store project's Label Studio labels equal what ``tasks`` (all of a Label Studio project's
    tasks, with their annotations: ``/api/tasks?fields=all`` pages or a JSON export) hold now.

    Missing labels are created, newer revisions applied, and labels whose annotation or task is gone
    (deleted, or turned into a draft) are tombstoned; an annotation that cannot be read (an unknown label)
    keeps what the store has, and is reported. Writes go in batches of ``batch_tasks`` tasks, each batch one
    transaction, and the tombstones in a last one: an interrupted run leaves no partial annotation and a
    second run finishes the job. Running it twice changes nothing the second time.
    """
    tr = LabelStudioTranslator.for_config(
        label_config if isinstance(label_config, str) and label_config.strip() else None, schema
    )
    report = ImportReport("label-studio-sync", project or store.project)
    stored = store.ls_label_versions(project)  # annotations already held at Label Studio's version: skipped
    keep: set[int] = set()
    unreadable: set[int] = set()
    pending: list[PendingLabel] = []
    videos: dict[str, VideoInfo] = {}
    in_batch = 0

    def flush() -> None:
        nonlocal pending, videos, in_batch
        if pending:
            results = write_labels(store, videos, pending, report, project)
            stale = [lab for lab, r in zip(pending, results, strict=True) if r is not None and not r.current]
            keep.update(r.annotation_id for r in results if r is not None)
            if stale:  # the store holds something newer (say, a tombstone): Label Studio's state wins
                now = to_utc(datetime.now(UTC))
                again = [replace(lab, updated_at=now) for lab in stale]
                write_labels(store, {lab.video: VideoInfo() for lab in again}, again, report, project)
        pending, videos, in_batch = [], {}, 0

    for task in progress_iter(tasks, progress, "label-studio sync", total):
        report.counts["tasks"] += 1
        for ann in task.get("annotations") or []:
            ann_id = ls_integer(ann.get("id"), "annotation id")
            report.counts["annotations"] += 1
            where = f"task {task.get('id')} annotation {ann_id}"
            if ann.get("was_cancelled"):
                report.skip(where, "skipped (cancelled) in Label Studio")
                continue
            held = stored.get(ann_id)
            if held is not None and to_utc(held[0]) == to_utc(ann.get("updated_at") or ann.get("created_at")):
                keep.update(held[1])
                report.counts["unchanged (already stored)"] += 1
                continue
            try:
                labels, skipped = tr.read(task, ann)
            except SurgenetAssistError as exc:
                unreadable.add(ann_id)
                report.skip(where, f"kept as stored: {exc.message}")
                continue
            for reason in skipped:
                report.skip(where, reason)
            for lab in labels:
                videos.setdefault(lab.video, VideoInfo())
            pending += labels
        in_batch += 1
        if in_batch >= batch_tasks:
            flush()
    flush()
    if report.counts["new revisions"] >= ANALYZE_AFTER:
        store.refresh_statistics()  # the tombstone query below and the next sync plan on fresh statistics
    now = to_utc(datetime.now(UTC))

    report.counts["tombstoned (gone from Label Studio)"] = store.transaction(
        lambda w: w.tombstone_ls_labels(project, keep=keep, spare_ls_annotations=unreadable, updated_at=now)
    )
    return report


def _recorded(res: RecordResult, deleted: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "annotation_id": res.annotation_id,
        "revision": res.revision,
        "created": res.created,
    }
    if deleted:
        out["deleted"] = True
    return out
