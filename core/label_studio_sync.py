"""Label Studio -> label store over time: webhook ingestion and reconciliation (``ls sync``).

:mod:`surgenet_assist.core.formats.label_studio` translates one Label Studio annotation into store labels and
back; this module decides *when* and *what* to write as Label Studio's state changes: an annotation event
applied as one transaction (:func:`apply_annotation`, :func:`ingest_webhook`), deletes as tombstones
(:func:`tombstone_ls_labels`), and a whole project made equal to Label Studio's
(:func:`reconcile_label_studio`).
The backend's verified webhooks (``backend/webhooks.py``) and ``ls sync`` (``backend/sync.py``) call these.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import DatasetFormatError, SurgenetAssistError
from .formats import ImportReport, PendingLabel, VideoInfo, progress_iter, stage_labels, write_labels
from .formats.label_studio import LabelStudioTranslator, TaskTarget, ls_integer, ls_provenance
from .schema import DEFAULT_SCHEMA, LabelSchema
from .store import LabelStore, RecordResult, Writer, revision_digest, to_utc

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
GONE = "tombstoned (gone from Label Studio)"
log = logging.getLogger(__name__)


def annotation_digest(
    task: dict[str, Any], annotation: dict[str, Any], target: TaskTarget, config: str
) -> str:
    """What decides an annotation's labels, hashed: its result, author and cancelled flag, its provenance
    (ground-truth star, the prediction it started from, whether someone touched it since:
    :func:`~.formats.label_studio.ls_provenance`), its task's id and store target (video, frame, media) and
    the labeling config (``config``: the digest of its text, from :func:`config_digest`). Label Studio's
    ``updated_at`` is left out on purpose: ``/api/labels/bulk`` and renaming a label change the result
    without it, a task-data or config change never touches it, and an
    edit that changes nothing should not make a new revision. (Key order counts: a server that reorders keys
    only makes the next sync read the annotation again, never skip a change.)"""
    who = annotation.get("completed_by")
    head = [
        config,
        bool(annotation.get("was_cancelled")),
        who.get("id") if isinstance(who, dict) else who,
        task.get("id"),
        [target.video, target.frame, target.media_key, target.media],
        ls_provenance(annotation, task).to_dict(),
    ]
    h = hashlib.sha256(json.dumps(head, default=str).encode())
    h.update(json.dumps(annotation.get("result") or [], default=str).encode())
    return h.hexdigest()


def config_digest(label_config: str | None) -> str:
    """The labeling config's part of :func:`annotation_digest` (computed once per sync)."""
    return hashlib.sha256((label_config or "").encode()).hexdigest()


def annotations_in(tasks: Iterable[dict[str, Any]]) -> Callable[[int], bool]:
    """``annotation_exists`` for a JSON export taken as Label Studio's whole state: an annotation that is not
    in it is gone (a reconciliation from a file, and tests)."""
    ids = {ls_integer(a.get("id"), "annotation id") for t in tasks for a in t.get("annotations") or []}
    return ids.__contains__


@dataclass
class _ReadAnnotation:
    """One annotation a sync read: its labels (none for a cancelled one) replace what the store holds."""

    ls_id: int
    updated_at: datetime | None
    digest: str
    labels: list[PendingLabel]


def reconcile_label_studio(
    store: LabelStore,
    tasks: Iterable[dict[str, Any]],
    *,
    annotation_exists: Callable[[int], bool],
    label_config: str | None = None,
    project: str | None = None,
    schema: LabelSchema = DEFAULT_SCHEMA,
    total: int | None = None,
    progress: bool = False,
    batch_tasks: int = 50,
) -> ImportReport:
    """Make the store project's Label Studio labels equal what ``tasks`` (all of a Label Studio project's
    tasks, with their annotations: ``/api/tasks?fields=all`` pages or a JSON export) hold now.

    Rules (``docs/deploy.md`` section 4), each because a live label must never be lost:

    * an annotation whose digest (:func:`annotation_digest`) and live revisions are what the last sync left
      is skipped; any other is read, and its labels replace what the store holds (labels it dropped are
      tombstoned, one it holds but the store has tombstoned is restored);
    * only labels written before this sync started (revision id at most the store's label version then) are
      replaced, restored or tombstoned: what a webhook writes meanwhile is newer than what the sync read;
    * a label whose annotation the sync did not see is tombstoned only when ``annotation_exists`` (Label
      Studio's answer for the annotation: False only for a 404) says it is gone, at ``max(now, its
      updated_at)`` with a warning when Label Studio's clock is ahead;
    * content that is already current adds no revision, so a sync that finds nothing new leaves the label
      version (what the day-one assistant refits on) where it was.

    An annotation that cannot be read (an unknown label) keeps what the store has, and is reported. Writes go
    in batches of ``batch_tasks`` tasks, each one transaction, and the tombstones in a last one: an
    interrupted run leaves no partial annotation and a second run finishes the job. Labels of other tools
    (napari, imports) are never touched.
    """
    tr = LabelStudioTranslator.for_config(
        label_config if isinstance(label_config, str) and label_config.strip() else None, schema
    )
    config = config_digest(label_config if isinstance(label_config, str) else None)
    report = ImportReport("label-studio-sync", project or store.project)
    watermark = store.label_version()  # before the first page is read: anything newer is not ours to undo
    states = store.ls_sync_states(project)
    live = store.ls_live_revisions(project)
    had_labels = set(live)
    seen: set[int] = set()
    batch: list[_ReadAnnotation] = []
    in_batch = 0

    def flush() -> None:
        nonlocal batch, in_batch
        if batch:
            counts, ahead = store.transaction(
                lambda w: _write_batch(w, batch, project, watermark, had_labels)
            )
            report.counts.update(counts)
            _warn_if_ahead(ahead, "restored labels", project or store.project)
        batch, in_batch = [], 0

    for task in progress_iter(tasks, progress, "label-studio sync", total):
        report.counts["tasks"] += 1
        for ann in task.get("annotations") or []:
            ann_id = ls_integer(ann.get("id"), "annotation id")
            seen.add(ann_id)
            report.counts["annotations"] += 1
            where = f"task {task.get('id')} annotation {ann_id}"
            try:
                digest = annotation_digest(task, ann, tr.target(task), config)
                state = states.get(ann_id)
                if state is not None and state == (digest, live.get(ann_id, frozenset())):
                    report.counts["unchanged (already stored)"] += 1
                    continue
                if ann.get("was_cancelled"):
                    labels: list[PendingLabel] = []
                    report.skip(where, "skipped (cancelled) in Label Studio")
                else:
                    labels, skipped = tr.read(task, ann)
                    for reason in skipped:
                        report.skip(where, reason)
                updated = to_utc(ann.get("updated_at") or ann.get("created_at"))
            except SurgenetAssistError as exc:
                report.skip(where, f"kept as stored: {exc.message}")
                continue
            report.counts["annotations read"] += 1
            batch.append(_ReadAnnotation(ann_id, updated, digest, labels))
        in_batch += 1
        if in_batch >= batch_tasks:
            flush()
    flush()
    if report.counts["new revisions"] >= ANALYZE_AFTER:
        store.refresh_statistics()  # the tombstone query below and the next sync plan on fresh statistics
    unseen = sorted((set(live) | set(states)) - seen)
    _tombstone_unseen(store, report, unseen, annotation_exists, project, watermark, progress)
    return report


def _now() -> datetime:
    """This machine's clock as the store keeps time (naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _later(label_time: datetime | None, now: datetime) -> datetime:
    """The time for a write that must supersede a label stamped ``label_time``: now, or just after the label
    when its clock (Label Studio's) runs ahead of this machine's."""
    if label_time is None or label_time < now:
        return now
    return label_time + timedelta(microseconds=1)


def _write_batch(
    w: Writer, batch: list[_ReadAnnotation], project: str | None, watermark: int, held: set[int]
) -> tuple[Counter[str], timedelta]:
    """One transaction: the batch's labels, the restores of those the store holds as tombstones (or as other
    content) from before this sync, the tombstones of labels the annotations dropped, and the sync state.
    ``held``: the Label Studio annotations that had live labels when the sync started. Returns the counts and
    how far the newest label it had to supersede was ahead of this machine's clock."""
    labels = [lab for a in batch for lab in a.labels]
    counts, results = stage_labels(w, {lab.video: VideoInfo() for lab in labels}, labels, project)
    # the store's current state matters where labels were there before, or where ours did not become current
    # (a cold sync asks nothing)
    ask = {a.ls_id for a in batch if a.ls_id in held}
    ask |= {lab.ls_annotation_id for lab, r in zip(labels, results, strict=True) if r and not r.current}
    found = w.current_ls_labels(project, ls_annotation_ids=ask, live_only=False) if ask else []
    current = {c.annotation.id: c for c in found}
    # per Label Studio annotation, per label: the revision that holds what we read (None: superseded)
    ours: dict[int | None, dict[int, int | None]] = defaultdict(dict)
    restore: list[tuple[PendingLabel, int]] = []
    now = _now()
    for lab, res in zip(labels, results, strict=True):
        if res is None:  # a delete of a label never stored: the translator sends none
            continue
        now_held = current.get(res.annotation_id)
        if res.current or now_held is None:
            ours[lab.ls_annotation_id][res.annotation_id] = res.revision_id
        elif now_held.revision_id > watermark:  # superseded during this sync (a webhook): newer than our read
            ours[lab.ls_annotation_id][res.annotation_id] = None
        elif not now_held.deleted and now_held.digest == revision_digest(lab.payload, lab.provenance):
            # the same content (and provenance) is current
            ours[lab.ls_annotation_id][res.annotation_id] = now_held.revision_id
        else:  # a tombstone, or other content, from before this sync: Label Studio's state wins
            restore.append((replace(lab, updated_at=_later(now_held.updated_at, now)), res.annotation_id))
    ahead = max((lab.updated_at - now for lab, _ in restore if lab.updated_at), default=timedelta(0))
    if restore:
        again = [lab for lab, _ in restore]
        restored, results = stage_labels(w, {lab.video: VideoInfo() for lab in again}, again, project)
        for (lab, aid), res in zip(restore, results, strict=True):
            ours[lab.ls_annotation_id][aid] = res.revision_id if res else None
        restored.pop("videos", None)
        counts.update(restored)
        counts["restored (Label Studio still holds them)"] += len(restore)
    edited = {a.ls_id: a.updated_at for a in batch}
    dropped = [  # live labels the annotations no longer hold; what a webhook wrote meanwhile stays
        (c.annotation, max(t for t in (edited[c.annotation.ls_annotation_id], c.updated_at) if t))
        for c in current.values()
        if not c.deleted
        and c.annotation.id not in ours[c.annotation.ls_annotation_id]
        and c.revision_id <= watermark
    ]
    counts[GONE] += w.tombstone_labels(dropped, project)
    save, forget = {}, []
    for a in batch:
        revisions = ours[a.ls_id]
        if None in revisions.values():  # a webhook superseded what we read: the next sync reads it again
            forget.append(a.ls_id)
        else:
            save[a.ls_id] = (a.digest, [r for r in revisions.values() if r is not None])  # (all are)
    w.save_ls_sync_states(project, save)
    w.forget_ls_sync_states(project, forget)
    return counts, ahead


def _tombstone_unseen(
    store: LabelStore,
    report: ImportReport,
    unseen: list[int],
    annotation_exists: Callable[[int], bool],
    project: str | None,
    watermark: int,
    progress: bool,
) -> None:
    """Tombstone the labels of the annotations the sync did not see, once Label Studio says they are gone."""
    gone = []
    for ann_id in progress_iter(unseen, progress, "label-studio sync: deletions", len(unseen)):
        if annotation_exists(ann_id):
            report.skip(
                f"annotation {ann_id}", "kept: Label Studio still has it, but not in a task it listed"
            )
        else:
            gone.append(ann_id)

    def write(w: Writer) -> tuple[int, timedelta]:
        now = _now()
        labels = [
            c for c in w.current_ls_labels(project, ls_annotation_ids=gone) if c.revision_id <= watermark
        ]
        ahead = max((c.updated_at - now for c in labels), default=timedelta(0))
        count = w.tombstone_labels([(c.annotation, _later(c.updated_at, now)) for c in labels], project)
        w.forget_ls_sync_states(project, gone)
        return count, ahead

    count, ahead = store.transaction(write) if gone else (0, timedelta(0))
    report.counts[GONE] += count
    _warn_if_ahead(ahead, "tombstones", project or store.project)


def _warn_if_ahead(ahead: timedelta, what: str, project: str) -> None:
    """Say so when Label Studio's clock runs ahead of ours: the writes were stamped after the labels they
    supersede (at our 'now' they would look older and stay behind them), but the clocks should agree."""
    if ahead > timedelta(0):
        log.warning(
            "ls sync of %s: Label Studio's clock is %.0f s ahead of this machine's; %s were stamped just "
            "after the labels they supersede so that they stay current. Synchronise both clocks (NTP).",
            project,
            ahead.total_seconds(),
            what,
        )


def _recorded(res: RecordResult, deleted: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "annotation_id": res.annotation_id,
        "revision": res.revision,
        "created": res.created,
    }
    if deleted:
        out["deleted"] = True
    return out
