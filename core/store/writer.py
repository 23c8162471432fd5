"""The writer: every write of one label-store transaction, and the SQL helpers writes share.

A :class:`Writer` wraps one open session; :meth:`LabelStore.transaction` creates it, commits when the
callback returns and retries the whole callback on lock/serialization conflicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import StoreError
from ..schema import LabelSchema
from . import payloads as pl
from .models import (
    Annotation,
    AnnotationRevision,
    Frame,
    LabelStudioSyncState,
    Prediction,
    Project,
    Video,
    utcnow,
)
from .records import SOURCES, AnnotationInput, RecordResult

T = TypeVar("T")
CHUNK = 500


class CurrentLabel(NamedTuple):
    """A label (its :class:`Annotation` row) with its current revision: id, content digest, tombstone or not,
    ``updated_at``."""

    annotation: Annotation
    revision_id: int
    digest: str
    deleted: bool
    updated_at: datetime


def chunks(seq: Sequence[T], n: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def dialect_insert(session: Session, table: sa.Table) -> Any:
    """Dialect insert supporting ON CONFLICT (SQLite and PostgreSQL both have it)."""
    return (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(table)


def is_unique_race(exc: BaseException) -> bool:
    """A unique-key clash between two first inserts (retry: the second attempt finds the row)."""
    return isinstance(exc, IntegrityError) and "foreign key" not in str(exc.orig).lower()


class Writer:
    """Writes inside one open transaction; obtained from :meth:`LabelStore.transaction`."""

    def __init__(self, session: Session, schema: LabelSchema, default_project: str) -> None:
        self.session = session
        self.schema = schema
        self.default_project = default_project
        self._projects: dict[str, int] = {}

    # --- projects, videos, frames ----------------------------------------------------------------------
    def ensure_project(self, name: str | None = None) -> int:
        name = name or self.default_project
        if name in self._projects:
            return self._projects[name]
        s = self.session
        pid = s.scalar(sa.select(Project.id).where(Project.name == name))
        if pid is None:
            s.execute(
                dialect_insert(s, Project.__table__)
                .values(name=name, created_at=utcnow())
                .on_conflict_do_nothing()
            )
            pid = s.scalar(sa.select(Project.id).where(Project.name == name))
        self._projects[name] = int(pid)
        return int(pid)

    def add_video(
        self,
        path: str,
        fps: float | None = None,
        frame_count: int | None = None,
        content_hash: str | None = None,
        *,
        split: str | None = None,
        project: str | None = None,
    ) -> int:
        pid = self.ensure_project(project)
        s = self.session
        video = s.scalar(sa.select(Video).where(Video.project_id == pid, Video.path == str(path)))
        if video is None:
            s.execute(
                dialect_insert(s, Video.__table__)
                .values(
                    project_id=pid,
                    path=str(path),
                    fps=fps,
                    frame_count=frame_count,
                    content_hash=content_hash,
                    split=split,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing()
            )
            video = s.scalar(sa.select(Video).where(Video.project_id == pid, Video.path == str(path)))
            assert video is not None
            return video.id
        if content_hash and video.content_hash and content_hash != video.content_hash:
            raise StoreError(
                f"video {path!r} is already stored with content hash {video.content_hash[:12]}…, "
                f"not {content_hash[:12]}…",
                "a different video under the same path: give it another path, or use another project",
            )
        if fps is not None and video.fps is None:
            video.fps = fps
        if frame_count is not None and (video.frame_count or 0) < frame_count:
            video.frame_count = frame_count
        if content_hash and not video.content_hash:
            video.content_hash = content_hash
        if split is not None:
            video.split = split
        return video.id

    def ensure_frames(
        self,
        video_id: int,
        indices: Iterable[int],
        *,
        split: str | None = None,
        image_paths: dict[int, str] | None = None,
    ) -> dict[int, int]:
        """Frame rows for ``indices`` (created if missing); returns frame index -> frame id."""
        s = self.session
        idx = sorted({int(i) for i in indices})
        if not idx:
            return {}
        fps = s.scalar(sa.select(Video.fps).where(Video.id == video_id))
        if fps is None and s.scalar(sa.select(Video.id).where(Video.id == video_id)) is None:
            raise StoreError(f"no video with id {video_id}", "add the video first (LabelStore.add_video)")
        rows = [
            {
                "video_id": video_id,
                "index": i,
                "timestamp": (i / fps if fps else None),
                "split": split,
                "image_path": (image_paths or {}).get(i),
            }
            for i in idx
        ]
        for part in chunks(rows, 2000):
            s.execute(dialect_insert(s, Frame.__table__).on_conflict_do_nothing(), list(part))
        out: dict[int, int] = {}
        for part in chunks(idx, 5000):
            q = sa.select(Frame.index, Frame.id).where(Frame.video_id == video_id, Frame.index.in_(part))
            out.update({int(i): int(f) for i, f in s.execute(q)})
        return out

    def set_split(self, video_id: int, split: str | None, frames: Iterable[int] | None = None) -> None:
        """Assign a split to a whole video or to some of its frames."""
        if frames is None:
            self.session.execute(sa.update(Video).where(Video.id == video_id).values(split=split))
            return
        for part in chunks(sorted({int(f) for f in frames})):
            self.session.execute(
                sa.update(Frame).where(Frame.video_id == video_id, Frame.index.in_(part)).values(split=split)
            )

    # --- predictions -----------------------------------------------------------------------------------
    def add_predictions(self, items: Sequence[dict[str, Any]]) -> list[int]:
        """Bulk form of :meth:`LabelStore.add_prediction`: dicts with the same keyword names."""
        rows = []
        for it in items:
            payload = pl.build_payload(it["task"], it["payload"], self.schema)
            start = int(it["frame_index"])
            rows.append(
                Prediction(
                    video_id=int(it["video_id"]),
                    frame_start=start,
                    frame_end=int(it.get("frame_end") or start),
                    task=payload.task,
                    payload=payload.data,
                    mask=payload.mask,
                    probabilities=jsonable(it.get("probabilities")),
                    uncertainty=opt_float(it.get("uncertainty")),
                    score=opt_float(it.get("score")),
                    model_version=it.get("model_version"),
                    created_at=utcnow(),
                )
            )
        self.check_videos({r.video_id for r in rows})
        self.session.add_all(rows)
        self.session.flush()
        return [r.id for r in rows]

    # --- human annotations -----------------------------------------------------------------------------
    def record_annotations(
        self, items: Sequence[AnnotationInput], project: str | None = None
    ) -> list[RecordResult]:
        """Record many human labels (see module doc for the idempotency rules)."""
        s = self.session
        pid = self.ensure_project(project)
        for it in items:
            if it.source not in SOURCES:
                raise StoreError(f"unknown annotation source {it.source!r}", f"use one of {list(SOURCES)}")
            pl.check_task(it.task)
            if it.end < it.frame_start or it.frame_start < 0:
                raise StoreError(
                    f"bad frame range {it.frame_start}..{it.end}", "frames are 0-based, end >= start"
                )
            if not it.deleted and it.payload is None:
                raise StoreError("an annotation needs a payload unless it is a delete")
        self.check_videos({it.video_id for it in items})
        singles: dict[int, set[int]] = defaultdict(set)
        for it in items:
            if it.end == it.frame_start:
                singles[it.video_id].add(it.frame_start)
        for vid, frames in singles.items():
            self.ensure_frames(vid, frames)

        keys = list(dict.fromkeys(it.identity() for it in items))
        anns: dict[str, Annotation] = {}
        for part in chunks(keys):
            for ann in s.scalars(
                sa.select(Annotation).where(Annotation.project_id == pid, Annotation.key.in_(part))
            ):
                anns[ann.key] = ann
        # history of the annotations that already exist: (digest, updated_at, deleted), max revision, newest
        history: dict[int, list[tuple[str, datetime, bool, int, int]]] = defaultdict(list)
        existing_ids = [a.id for a in anns.values()]
        for part in chunks(existing_ids):
            q = sa.select(
                AnnotationRevision.annotation_id,
                AnnotationRevision.digest,
                AnnotationRevision.updated_at,
                AnnotationRevision.deleted,
                AnnotationRevision.revision,
                AnnotationRevision.id,
            ).where(AnnotationRevision.annotation_id.in_(part))
            for aid, dig, upd, dele, rev, rid in s.execute(q):
                history[aid].append((dig, upd, bool(dele), rev, rid))

        new_anns = []
        for it in items:
            k = it.identity()
            ann = anns.get(k)
            if ann is None:
                if it.deleted:
                    continue
                ann = Annotation(
                    project_id=pid,
                    key=k,
                    video_id=it.video_id,
                    frame_start=it.frame_start,
                    frame_end=it.end,
                    task=it.task,
                    source=it.source,
                    ls_task_id=it.ls_task_id,
                    ls_annotation_id=it.ls_annotation_id,
                    created_at=utcnow(),
                )
                anns[k] = ann
                new_anns.append(ann)
            elif (ann.video_id, ann.frame_start, ann.frame_end, ann.task) != (
                it.video_id,
                it.frame_start,
                it.end,
                it.task,
            ):
                raise StoreError(
                    f"annotation {k!r} is stored for video {ann.video_id}"
                    f" frames {ann.frame_start}..{ann.frame_end} task {ann.task}, not video {it.video_id}"
                    f" frames {it.frame_start}..{it.end} task {it.task}",
                    "an annotation's key must always name the same frame(s) and task",
                )
        s.add_all(new_anns)
        s.flush()

        results: list[RecordResult | None] = []
        now = utcnow()
        for it in items:
            ann = anns.get(it.identity())
            if ann is None:  # delete of a label never stored: nothing to do
                results.append(None)
                continue
            hist = history[ann.id]
            digest = "tombstone" if it.deleted else it.payload.digest()  # type: ignore[union-attr]
            upd = it.updated_at
            newest = max(hist, key=lambda h: (h[1], h[4])) if hist else None
            match = None
            if upd is not None:
                match = next((h for h in hist if h[0] == digest and h[1] == upd and h[2] == it.deleted), None)
            elif newest is not None and newest[0] == digest and newest[2] == it.deleted:
                match = newest
            if match is not None:
                results.append(RecordResult(ann.id, match[4], match[3], False, match is newest))
                continue
            upd = upd or now
            revno = max((h[3] for h in hist), default=0) + 1
            is_current = newest is None or upd >= newest[1]
            rev = AnnotationRevision(
                annotation_id=ann.id,
                revision=revno,
                payload=None if it.deleted else it.payload.data,  # type: ignore[union-attr]
                mask=None if it.deleted else it.payload.mask,  # type: ignore[union-attr]
                digest=digest,
                deleted=it.deleted,
                author=it.author,
                source=it.source,
                updated_at=upd,
                recorded_at=now,
            )
            s.add(rev)
            s.flush()
            hist.append((digest, upd, it.deleted, revno, rev.id))
            results.append(RecordResult(ann.id, rev.id, revno, True, is_current))
        return results  # type: ignore[return-value]

    def tombstone_ls_labels(
        self,
        project: str | None = None,
        *,
        ls_annotation_ids: Iterable[int] | None = None,
        ls_task_ids: Iterable[int] | None = None,
        keep: Iterable[int] = (),
        spare_ls_annotations: Iterable[int] = (),
        updated_at: datetime | None = None,
    ) -> int:
        """Tombstone, in this transaction, the project's live labels that came from these Label Studio
        annotations or tasks (both None: from any), except the labels (store annotation ids) in ``keep`` and
        those of the Label Studio annotations in ``spare_ls_annotations``; returns how many tombstones were
        added. Reading and writing them in one transaction is what makes "replace this annotation's labels"
        and a reconciliation atomic."""
        kept, spared = set(keep), set(spare_ls_annotations)
        stale = [
            (c.annotation, updated_at)
            for c in self.current_ls_labels(
                project, ls_annotation_ids=ls_annotation_ids, ls_task_ids=ls_task_ids
            )
            # a tombstone older than the live revision would not be current: skip it
            if (updated_at is None or c.updated_at <= updated_at)
            and c.annotation.id not in kept
            and c.annotation.ls_annotation_id not in spared
        ]
        return self.tombstone_labels(stale, project)

    def current_ls_labels(
        self,
        project: str | None = None,
        *,
        ls_annotation_ids: Iterable[int] | None = None,
        ls_task_ids: Iterable[int] | None = None,
        live_only: bool = True,
    ) -> list[CurrentLabel]:
        """The project's Label Studio labels with their current revision (only the live ones unless
        ``live_only`` is False), from these Label Studio annotations or tasks (both None: from any).

        Reads the labels by their indexed Label Studio ids, then only their revisions: a sync calls it for
        every batch, and the window query over every revision (``current_revisions``) would make that
        quadratic, and slow on PostgreSQL while its statistics lag behind a bulk write."""
        q = sa.select(Annotation).where(
            Annotation.project_id == self.ensure_project(project), Annotation.source == "label-studio"
        )
        if ls_task_ids is not None:
            q = q.where(Annotation.ls_task_id.in_(sorted({int(i) for i in ls_task_ids})))
        parts: list[Sequence[int] | None] = [None]
        if ls_annotation_ids is not None:  # possibly many (a whole project's deletions): in chunks
            parts = list(chunks(sorted({int(i) for i in ls_annotation_ids})))
        anns: dict[int, Annotation] = {}
        for part in parts:
            for ann in self.session.scalars(
                q if part is None else q.where(Annotation.ls_annotation_id.in_(part))
            ):
                anns[ann.id] = ann
        R = AnnotationRevision
        newest: dict[int, tuple[datetime, int, str, bool]] = {}
        for part in chunks(sorted(anns)):
            rows = self.session.execute(
                sa.select(R.annotation_id, R.updated_at, R.id, R.digest, R.deleted).where(
                    R.annotation_id.in_(part)
                )
            )
            for aid, upd, rid, digest, deleted in rows:  # the current one: newest updated_at, then id
                if aid not in newest or (upd, rid) > newest[aid][:2]:
                    newest[aid] = (upd, rid, digest, bool(deleted))
        return [
            CurrentLabel(anns[aid], rid, digest, deleted, upd)
            for aid, (upd, rid, digest, deleted) in sorted(newest.items())
            if not (live_only and deleted)
        ]

    def tombstone_labels(
        self, labels: Iterable[tuple[Annotation, datetime | None]], project: str | None
    ) -> int:
        """Tombstone these labels, each at its time (None: now), in this transaction; returns how many
        tombstones were added (a label whose tombstone is already stored counts nothing)."""
        stale = [
            AnnotationInput(
                a.video_id,
                a.frame_start,
                a.task,
                None,
                a.source,
                frame_end=a.frame_end,
                ls_task_id=a.ls_task_id,
                ls_annotation_id=a.ls_annotation_id,
                key=a.key,
                updated_at=when,
                deleted=True,
            )
            for a, when in labels
        ]
        return sum(1 for r in self.record_annotations(stale, project) if r is not None and r.created)

    # --- Label Studio sync state (what ``ls sync`` read last time) -----------------------------------------
    def save_ls_sync_states(self, project: str | None, states: dict[int, tuple[str, Sequence[int]]]) -> None:
        """Remember, per Label Studio annotation id, the digest a sync read and the revisions it left live."""
        if not states:
            return
        s, pid, now = self.session, self.ensure_project(project), utcnow()
        rows = [
            {
                "project_id": pid,
                "ls_annotation_id": int(i),
                "digest": digest,
                "revision_ids": sorted(int(r) for r in revisions),
                "synced_at": now,
            }
            for i, (digest, revisions) in sorted(states.items())
        ]
        for part in chunks(rows):
            stmt = dialect_insert(s, LabelStudioSyncState.__table__).values(list(part))
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=["project_id", "ls_annotation_id"],
                    set_={k: stmt.excluded[k] for k in ("digest", "revision_ids", "synced_at")},
                )
            )

    def forget_ls_sync_states(self, project: str | None, ls_annotation_ids: Iterable[int]) -> None:
        """Drop the sync state of these Label Studio annotations (the next sync reads them again)."""
        pid = self.ensure_project(project)
        S = LabelStudioSyncState
        for part in chunks(sorted({int(i) for i in ls_annotation_ids})):
            self.session.execute(sa.delete(S).where(S.project_id == pid, S.ls_annotation_id.in_(part)))

    def check_videos(self, ids: set[int]) -> None:
        """Refuse ids of videos that do not exist (a clear error instead of a foreign-key failure)."""
        known: set[int] = set()
        for part in chunks(sorted(ids)):
            known.update(self.session.scalars(sa.select(Video.id).where(Video.id.in_(part))))
        missing = ids - known
        if missing:
            raise StoreError(f"no video with id(s) {sorted(missing)[:10]}", "add the video first (add_video)")


def jsonable(value: Any) -> Any:
    """numpy arrays and scalars (nested in dicts/lists too) as plain JSON values; arrays rounded to 1e-6."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return np.round(value.astype(np.float64), 6).tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
